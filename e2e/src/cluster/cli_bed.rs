//! The supervisor's requests for running twinvol on the bed (what the demo
//! asks for, and a person installing the chart by hand): build and import
//! the chart's images, the chart's values for this bed, a records workload
//! (the scenario tests' StatefulSet) with its record collector, and the
//! check that every acknowledged record is in the volume.
//!
//! The collectors live in the supervisor, not in the caller: a StatefulSet
//! left running (`demo.sh --keep`) keeps writing to one after the caller
//! has exited. Each appends to `collector.<app>.log` in the cluster's
//! directory.

use std::{
    collections::BTreeMap,
    path::Path,
    time::{Duration, Instant},
};

use serde_json::{Value, json};

use crate::{
    HarnessError, bed,
    cluster::{Cluster, Site},
    workload::{self, Collector},
};

/// The supervisor's state beside its cluster.
#[derive(Default)]
pub struct Workbench {
    collectors: BTreeMap<String, Collector>,
}

fn field<'a>(request: &'a Value, name: &'static str) -> Result<&'a str, HarnessError> {
    request[name]
        .as_str()
        .filter(|v| !v.is_empty())
        .ok_or_else(|| HarnessError::Cluster(format!("the request lacks {name:?}")))
}

/// A DNS label (what a StatefulSet's name and its pods' names need).
fn dns_label(option: &'static str, value: &str) -> Result<(), HarnessError> {
    let ok = !value.is_empty()
        && value.len() <= 52
        && value
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !value.starts_with('-')
        && !value.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(HarnessError::InvalidOption {
            option,
            value: format!("{value} (lower-case letters, digits and '-', at most 52)"),
        })
    }
}

/// A size like `512Mi` or `1Gi`.
fn quantity(value: &str) -> Result<(), HarnessError> {
    let digits = value.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let unit = &value[digits.len()..];
    let ok = !digits.is_empty()
        && digits.chars().all(|c| c.is_ascii_digit())
        && ["", "Ki", "Mi", "Gi", "Ti", "k", "M", "G", "T"].contains(&unit);
    if ok {
        Ok(())
    } else {
        Err(HarnessError::InvalidOption {
            option: "size",
            value: format!("{value} (a quantity such as 512Mi or 1Gi)"),
        })
    }
}

impl Workbench {
    /// Answers `op` when it is one of this module's; None otherwise.
    pub async fn handle(
        &mut self,
        cluster: &mut Cluster,
        op: &str,
        request: &Value,
    ) -> Option<Result<Value, HarnessError>> {
        Some(match op {
            "images" => images(cluster, request),
            "values" => field(request, "tag")
                .and_then(|tag| bed::values(cluster, tag))
                .map(|values| json!({"values": values})),
            "workload" => self.workload(cluster, request).await,
            "records" => self.records(cluster, request),
            _ => return None,
        })
    }

    async fn workload(
        &mut self,
        cluster: &Cluster,
        request: &Value,
    ) -> Result<Value, HarnessError> {
        let name = field(request, "name")?;
        dns_label("name", name)?;
        let storage_class = field(request, "storage_class")?;
        let size = field(request, "size")?;
        quantity(size)?;
        let site: Site =
            field(request, "site")?
                .parse()
                .map_err(|e: String| HarnessError::InvalidOption {
                    option: "site",
                    value: e,
                })?;
        let collector = match self.collectors.get(name) {
            Some(c) => c.clone(),
            None => {
                let log = cluster.root().join(format!("collector.{name}.log"));
                let c = Collector::to_file(cluster.control_plane_ip(), &log).await?;
                self.collectors.insert(name.to_owned(), c.clone());
                c
            }
        };
        let addr = collector
            .addr
            .ok_or_else(|| HarnessError::Cluster("the collector has no address".into()))?;
        let manifest = workload::statefulset(
            name,
            storage_class,
            size,
            &site.zone(),
            addr,
            &cluster.nodes_dir(),
        );
        Ok(json!({"manifest": manifest, "collector": addr.to_string()}))
    }

    /// Reads the records file in `pod` and checks it against every record
    /// `app` acknowledged (its collector's and the nodes' logs), which are
    /// read first: the writer goes on meanwhile.
    fn records(&self, cluster: &Cluster, request: &Value) -> Result<Value, HarnessError> {
        let app = field(request, "app")?;
        let pod = field(request, "pod")?;
        dns_label("app", app)?;
        let nodes = cluster.nodes_dir();
        let mut acked = workload::acked_on_nodes(&nodes, app);
        if let Some(collector) = self.collectors.get(app) {
            acked.extend(collector.lines());
        }
        acked.sort();
        acked.dedup();
        let node = cluster.kubectl_ok(&["get", "pod", pod, "-o", "jsonpath={.spec.nodeName}"])?;
        let file = cluster.kubectl_ok(&["exec", pod, "--", "cat", "/data/records"])?;
        let v = workload::verify(&file, &acked);
        Ok(json!({
            "pod": pod,
            "node": node,
            "acked": acked.len(),
            "found": v.found,
            "missing": v.missing.len(),
            "missing_first": v.missing.iter().take(5).collect::<Vec<_>>(),
            "valid": v.valid,
            "invalid": v.invalid.len(),
            "incarnations": v.incarnations,
            "io_errors": workload::io_errors(&nodes, app),
        }))
    }
}

fn images(cluster: &mut Cluster, request: &Value) -> Result<Value, HarnessError> {
    let bin_dir = Path::new(field(request, "bin_dir")?);
    let tag = field(request, "tag")?;
    let started = Instant::now();
    bed::add_images(cluster, bin_dir, tag)?;
    let mut names = vec![format!("twinvol.local/twinvol:{tag}")];
    names.extend(
        bed::SIDECARS
            .iter()
            .map(|(b, v)| format!("twinvol.local/{b}:{v}")),
    );
    Ok(json!({
        "message": format!(
            "{} built and imported into every node in {:.1} s",
            names.join(", "),
            started.elapsed().as_secs_f64()
        ),
    }))
}

/// The one-line summary of a `records` answer, and whether every
/// acknowledged record was found.
pub fn summarize_records(answer: &Value) -> (String, bool) {
    let n = |k: &str| answer[k].as_u64().unwrap_or(0);
    let incarnations: Vec<String> = answer["incarnations"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| format!("{k}: {}", v.as_u64().unwrap_or(0)))
                .collect()
        })
        .unwrap_or_default();
    let errors = answer["io_errors"].as_array().map_or(0, Vec::len);
    let mut text = format!(
        "{} records acknowledged, {} found in /data/records of {} on {}, {} missing; \
         {} lines verify, {} do not (a torn tail is fine); writer runs {}; {} I/O errors seen",
        n("acked"),
        n("found"),
        answer["pod"].as_str().unwrap_or("-"),
        answer["node"].as_str().unwrap_or("-"),
        n("missing"),
        n("valid"),
        n("invalid"),
        if incarnations.is_empty() {
            "-".to_owned()
        } else {
            incarnations.join(", ")
        },
        errors,
    );
    if n("missing") > 0 {
        text.push_str(&format!("\nMISSING (first 5): {}", answer["missing_first"]));
    }
    (text, n("missing") == 0 && n("found") == n("acked"))
}

/// How long `records --at-least` waits for the writer.
pub const RECORDS_WAIT: Duration = Duration::from_secs(90);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_sizes_are_checked_before_anything_starts() {
        assert!(dns_label("name", "writer").is_ok());
        assert!(dns_label("name", "Writer").is_err());
        assert!(dns_label("name", "-w").is_err());
        assert!(quantity("512Mi").is_ok());
        assert!(quantity("1Gi").is_ok());
        assert!(quantity("lots").is_err());
        assert!(quantity("12Qi").is_err());
    }

    #[test]
    fn a_records_summary_fails_on_a_missing_record() {
        let ok = json!({"acked": 3, "found": 3, "missing": 0, "valid": 3, "invalid": 0,
            "pod": "writer-0", "node": "node-b1", "incarnations": {"ab12cd34": 3}, "io_errors": []});
        let (text, good) = summarize_records(&ok);
        assert!(good, "{text}");
        assert!(
            text.starts_with("3 records acknowledged, 3 found"),
            "{text}"
        );
        let mut lost = ok.clone();
        lost["found"] = json!(2);
        lost["missing"] = json!(1);
        assert!(!summarize_records(&lost).1);
    }
}
