//! The harness itself against the real upstream binaries: the control plane
//! starts, kubectl and the kube client reach it, and dropping it leaves no
//! process and no file behind.

use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use kube::Api;
use nix::{sys::signal::kill, unistd::Pid};
use twinvol_e2e::{
    ControlPlane, ControlPlaneOptions,
    wait::{self, Poll},
};

fn alive(pid: u32) -> bool {
    let pid = i32::try_from(pid).expect("pid fits i32");
    kill(Pid::from_raw(pid), None).is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_server_serves_kubectl_and_client_then_leaves_nothing_behind() {
    let plane = ControlPlane::start(ControlPlaneOptions::api_server_only())
        .await
        .expect("control plane starts (binaries from e2e/tools/build-upstream.sh)");

    let readyz = plane
        .kubectl_ok(&["get", "--raw", "/readyz"])
        .expect("kubectl reaches the API server");
    assert_eq!(readyz.trim(), "ok");

    let version: serde_json::Value = serde_json::from_str(
        &plane
            .kubectl_ok(&["version", "-o", "json"])
            .expect("kubectl version"),
    )
    .expect("version JSON");
    let server = version["serverVersion"]["gitVersion"]
        .as_str()
        .unwrap_or("");
    assert!(server.starts_with("v1.36."), "server version {server}");

    // The API server's bootstrap controller creates `default`; seen through
    // the kube client, the same client the operator will use.
    let namespaces: Api<Namespace> = Api::all(plane.client());
    wait::until(Duration::from_secs(60), || async {
        match namespaces.get_opt("default").await {
            Ok(Some(_)) => Poll::Ready(()),
            Ok(None) => Poll::Pending("namespace default not created yet".into()),
            Err(e) => Poll::Pending(e.to_string()),
        }
    })
    .await
    .expect("namespace default appears");

    let pids = plane.pids();
    let names: Vec<&str> = pids.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(names, ["etcd", "kube-apiserver"]);
    let dir = plane.dir().to_owned();
    assert!(dir.join("logs/kube-apiserver.log").exists());
    drop(plane);

    for (name, pid) in pids {
        assert!(!alive(pid), "{name} (pid {pid}) still running after drop");
    }
    assert!(!dir.exists(), "{} not removed", dir.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_manager_and_scheduler_run_when_asked() {
    let plane = ControlPlane::start(ControlPlaneOptions::default().with_controllers())
        .await
        .expect("control plane with controller-manager and scheduler starts");
    let names: Vec<String> = plane.pids().into_iter().map(|(name, _)| name).collect();
    assert_eq!(
        names,
        [
            "etcd",
            "kube-apiserver",
            "kube-controller-manager",
            "kube-scheduler"
        ]
    );
    // The service-account controller of kube-controller-manager gives every
    // namespace a `default` ServiceAccount: visible proof its loops run.
    let accounts: Api<ServiceAccount> = Api::namespaced(plane.client(), "default");
    wait::until(Duration::from_secs(90), || async {
        match accounts.get_opt("default").await {
            Ok(Some(_)) => Poll::Ready(()),
            Ok(None) => Poll::Pending("no default ServiceAccount yet".into()),
            Err(e) => Poll::Pending(e.to_string()),
        }
    })
    .await
    .expect("kube-controller-manager creates the default ServiceAccount");
}
