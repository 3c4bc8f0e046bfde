//! Registration with kubelet, by the plugin itself: kubelet's plugin
//! watcher finds `<kubelet-dir>/plugins_registry/csi.twinvol.io-reg.sock`,
//! calls `GetInfo` (type `CSIPlugin`, the driver name, the CSI socket's
//! absolute path on the host, CSI versions `1.0.0`), then
//! `NotifyRegistrationStatus`; after that it calls NodeGetInfo on the CSI
//! socket and writes the node's CSINode object. This is what
//! node-driver-registrar does, which the Go module proxy here does not
//! serve.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tonic::{Request, Response, Status};

use crate::names::DRIVER_NAME;
use crate::proto::registration::registration_server::Registration;
use crate::proto::registration::{
    InfoRequest, PluginInfo, RegistrationStatus, RegistrationStatusResponse,
};

/// The registration socket kubelet watches for.
pub fn socket_path(kubelet_dir: &Path) -> PathBuf {
    kubelet_dir
        .join("plugins_registry")
        .join(format!("{DRIVER_NAME}-reg.sock"))
}

/// What kubelet said about the registration, if it said anything yet.
#[derive(Debug, Clone, Default)]
pub struct RegistrationState(Arc<Mutex<Option<Result<(), String>>>>);

impl RegistrationState {
    pub fn get(&self) -> Option<Result<(), String>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set(&self, value: Result<(), String>) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(value);
    }
}

/// The Registration service.
#[derive(Debug, Clone)]
pub struct RegistrationService {
    csi_socket: PathBuf,
    state: RegistrationState,
}

impl RegistrationService {
    /// `csi_socket`: the CSI endpoint as kubelet reaches it on the host.
    pub fn new(csi_socket: PathBuf, state: RegistrationState) -> Self {
        Self { csi_socket, state }
    }
}

#[tonic::async_trait]
impl Registration for RegistrationService {
    async fn get_info(
        &self,
        _request: Request<InfoRequest>,
    ) -> Result<Response<PluginInfo>, Status> {
        tracing::info!("kubelet asked for the plugin's registration info");
        Ok(Response::new(PluginInfo {
            r#type: "CSIPlugin".to_owned(),
            name: DRIVER_NAME.to_owned(),
            endpoint: self.csi_socket.display().to_string(),
            supported_versions: vec!["1.0.0".to_owned()],
        }))
    }

    async fn notify_registration_status(
        &self,
        request: Request<RegistrationStatus>,
    ) -> Result<Response<RegistrationStatusResponse>, Status> {
        let status = request.into_inner();
        if status.plugin_registered {
            tracing::info!("kubelet registered the plugin");
            self.state.set(Ok(()));
        } else {
            tracing::error!(error = %status.error, "kubelet refused the plugin's registration");
            self.state.set(Err(status.error));
        }
        Ok(Response::new(RegistrationStatusResponse {}))
    }
}
