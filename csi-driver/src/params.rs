//! StorageClass parameters (CreateVolume `parameters`) and the sizes and
//! filesystems they lead to, as pure functions.
//!
//! | key | value | default |
//! |---|---|---|
//! | `sites` | two Site names, comma-separated (`room-a,room-b`) | the pod's Site and another from the topology requirement |
//! | `failback` | `Automatic` or `Manual` | `Automatic` |
//! | `resyncRateLimit` | bytes per second as a quantity (`200Mi`) | unlimited |
//! | `preferredSite` | one of the two Sites | none |
//! | `fsType` | `ext4` or `xfs` | the capability's, else `ext4` |
//!
//! Keys under `csi.storage.k8s.io/` are the sidecars' own (PVC name and
//! namespace with `--extra-create-metadata`, secrets) and are ignored. Any
//! other key is refused, naming it: a typo must not silently give a volume
//! other than the one asked for.

use std::collections::HashMap;
use std::fmt;

use twinvol_crds::{Failback, RateLimit, SiteName};

use crate::error::{CsiError, CsiResult};

pub const KEY_SITES: &str = "sites";
pub const KEY_FAILBACK: &str = "failback";
pub const KEY_RESYNC_RATE_LIMIT: &str = "resyncRateLimit";
pub const KEY_PREFERRED_SITE: &str = "preferredSite";
pub const KEY_FS_TYPE: &str = "fsType";
const KNOWN: [&str; 5] = [
    KEY_SITES,
    KEY_FAILBACK,
    KEY_RESYNC_RATE_LIMIT,
    KEY_PREFERRED_SITE,
    KEY_FS_TYPE,
];
const SIDECAR_PREFIX: &str = "csi.storage.k8s.io/";

/// Volume sizes are whole 4 KiB blocks (the engine's block size).
pub const SIZE_ALIGN: u64 = twinvol_engine::replica::pool::SIZE_ALIGN;
/// The size of a volume whose request gives none.
pub const DEFAULT_SIZE: u64 = 1 << 30;

/// A filesystem the node can make and grow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsType {
    Ext4,
    Xfs,
}

impl FsType {
    pub fn parse(value: &str) -> Option<Self> {
        match value {
            "ext4" => Some(Self::Ext4),
            "xfs" => Some(Self::Xfs),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ext4 => "ext4",
            Self::Xfs => "xfs",
        }
    }
}

impl fmt::Display for FsType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the parameters ask for.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct VolumeParams {
    pub sites: Option<[SiteName; 2]>,
    pub failback: Failback,
    pub resync_rate_limit: Option<RateLimit>,
    pub preferred_site: Option<SiteName>,
    pub fs_type: Option<FsType>,
}

fn bad(key: &str, reason: impl Into<String>) -> CsiError {
    CsiError::BadParameter {
        key: key.to_owned(),
        reason: reason.into(),
    }
}

fn site(key: &str, value: &str) -> CsiResult<SiteName> {
    SiteName::new(value.trim()).map_err(|e| bad(key, e.to_string()))
}

/// Parses and checks the parameters of a CreateVolume request.
pub fn parse(parameters: &HashMap<String, String>) -> CsiResult<VolumeParams> {
    let mut params = VolumeParams::default();
    let mut keys: Vec<&String> = parameters.keys().collect();
    keys.sort();
    for key in keys {
        let value = parameters[key].as_str();
        match key.as_str() {
            KEY_SITES => {
                let names: Vec<&str> = value.split(',').map(str::trim).collect();
                let [a, b] = names.as_slice() else {
                    return Err(bad(
                        key,
                        format!("must name exactly two Sites, comma-separated (got {value:?})"),
                    ));
                };
                let (a, b) = (site(key, a)?, site(key, b)?);
                if a == b {
                    return Err(bad(
                        key,
                        format!("names {a} twice; give two different Sites"),
                    ));
                }
                params.sites = Some([a, b]);
            }
            KEY_FAILBACK => {
                params.failback = match value {
                    "Automatic" => Failback::Automatic,
                    "Manual" => Failback::Manual,
                    _ => {
                        return Err(bad(
                            key,
                            format!("{value:?} is neither Automatic nor Manual"),
                        ));
                    }
                }
            }
            KEY_RESYNC_RATE_LIMIT => {
                let limit = RateLimit::new(value).map_err(|e| bad(key, e.to_string()))?;
                params.resync_rate_limit = Some(limit);
            }
            KEY_PREFERRED_SITE => params.preferred_site = Some(site(key, value)?),
            KEY_FS_TYPE => {
                params.fs_type = Some(
                    FsType::parse(value)
                        .ok_or_else(|| bad(key, format!("{value:?} is not ext4 or xfs")))?,
                );
            }
            other if other.starts_with(SIDECAR_PREFIX) => {}
            other => {
                return Err(bad(
                    other,
                    format!("unknown parameter; the known ones are {}", KNOWN.join(", ")),
                ));
            }
        }
    }
    if let (Some(preferred), Some(sites)) = (&params.preferred_site, &params.sites)
        && !sites.contains(preferred)
    {
        return Err(bad(
            KEY_PREFERRED_SITE,
            format!(
                "{preferred} is not one of the sites {}, {}",
                sites[0], sites[1]
            ),
        ));
    }
    Ok(params)
}

/// The volume size for a capacity range: the required bytes (or the
/// default when neither bound is given) rounded up to whole blocks, within
/// the limit.
pub fn size_for(required: i64, limit: i64) -> CsiResult<u64> {
    if required < 0 || limit < 0 {
        return Err(CsiError::CapacityOutOfRange {
            reason: format!("negative bytes (required {required}, limit {limit})"),
        });
    }
    let (required, limit) = (required.unsigned_abs(), limit.unsigned_abs());
    if limit != 0 && required > limit {
        return Err(CsiError::CapacityOutOfRange {
            reason: format!("required_bytes {required} is above limit_bytes {limit}"),
        });
    }
    let wanted = match (required, limit) {
        (0, 0) => DEFAULT_SIZE,
        (0, limit) => DEFAULT_SIZE.min(limit),
        (required, _) => required,
    };
    let size = wanted.div_ceil(SIZE_ALIGN) * SIZE_ALIGN;
    if limit != 0 && size > limit {
        // The limit is not a whole number of blocks: round down instead,
        // if that still holds what is required.
        let down = limit / SIZE_ALIGN * SIZE_ALIGN;
        if down >= required && down > 0 {
            return Ok(down);
        }
        return Err(CsiError::CapacityOutOfRange {
            reason: format!(
                "no whole number of {SIZE_ALIGN}-byte blocks lies between {required} and {limit} bytes"
            ),
        });
    }
    Ok(size)
}

/// Whether an existing volume of `size` bytes satisfies a capacity range.
pub fn size_fits(size: u64, required: i64, limit: i64) -> bool {
    let required = u64::try_from(required).unwrap_or(0);
    let limit = u64::try_from(limit).unwrap_or(0);
    size >= required && (limit == 0 || size <= limit)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn bad_key(result: CsiResult<VolumeParams>) -> String {
        match result {
            Err(CsiError::BadParameter { key, .. }) => key,
            other => panic!("expected a bad parameter, got {other:?}"),
        }
    }

    #[test]
    fn every_parameter_is_read() {
        let p = parse(&map(&[
            ("sites", "room-a, room-b"),
            ("failback", "Manual"),
            ("resyncRateLimit", "200Mi"),
            ("preferredSite", "room-b"),
            ("fsType", "xfs"),
            ("csi.storage.k8s.io/pvc/name", "data-0"),
        ]))
        .expect("valid");
        let sites = p.sites.expect("sites");
        assert_eq!([sites[0].as_str(), sites[1].as_str()], ["room-a", "room-b"]);
        assert_eq!(p.failback, Failback::Manual);
        assert_eq!(p.resync_rate_limit.expect("limit").as_str(), "200Mi");
        assert_eq!(p.preferred_site.expect("preferred").as_str(), "room-b");
        assert_eq!(p.fs_type, Some(FsType::Xfs));
    }

    #[test]
    fn no_parameters_is_all_defaults() {
        assert_eq!(
            parse(&HashMap::new()).expect("valid"),
            VolumeParams::default()
        );
    }

    #[test]
    fn a_bad_parameter_is_named() {
        assert_eq!(bad_key(parse(&map(&[("sites", "room-a")]))), "sites");
        assert_eq!(bad_key(parse(&map(&[("sites", "a,a")]))), "sites");
        assert_eq!(bad_key(parse(&map(&[("sites", "a,B")]))), "sites");
        assert_eq!(bad_key(parse(&map(&[("failback", "auto")]))), "failback");
        assert_eq!(
            bad_key(parse(&map(&[("resyncRateLimit", "fast")]))),
            "resyncRateLimit"
        );
        assert_eq!(
            bad_key(parse(&map(&[("resyncRateLimit", "0")]))),
            "resyncRateLimit"
        );
        assert_eq!(bad_key(parse(&map(&[("fsType", "btrfs")]))), "fsType");
        assert_eq!(bad_key(parse(&map(&[("site", "a,b")]))), "site");
        assert_eq!(
            bad_key(parse(&map(&[("sites", "a,b"), ("preferredSite", "c")]))),
            "preferredSite"
        );
    }

    #[test]
    fn sizes_round_up_to_blocks_within_the_limit() {
        assert_eq!(size_for(0, 0).expect("default"), DEFAULT_SIZE);
        assert_eq!(size_for(1, 0).expect("rounded"), 4096);
        assert_eq!(size_for(4096, 4096).expect("exact"), 4096);
        assert_eq!(size_for(0, 10_000).expect("limit only"), 8192);
        assert_eq!(size_for(5000, 10_000).expect("rounded"), 8192);
        assert!(matches!(
            size_for(5000, 6000),
            Err(CsiError::CapacityOutOfRange { .. })
        ));
        assert!(matches!(
            size_for(10, 5),
            Err(CsiError::CapacityOutOfRange { .. })
        ));
        assert!(matches!(
            size_for(-1, 0),
            Err(CsiError::CapacityOutOfRange { .. })
        ));
    }

    #[test]
    fn an_existing_size_fits_a_range() {
        assert!(size_fits(8192, 5000, 0));
        assert!(size_fits(8192, 8192, 8192));
        assert!(!size_fits(8192, 9000, 0));
        assert!(!size_fits(8192, 0, 4096));
    }
}
