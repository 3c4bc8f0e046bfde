//! Container images made on this machine, since nothing can be pulled: a
//! root filesystem described in code (files copied from the host, with the
//! shared libraries a dynamic executable needs, found with `ldd`), written
//! as a one-layer docker-archive tarball that `ctr images import` takes.
//!
//! Builds are reproducible (entries sorted, owner root, mtime 0), and cached
//! by content: the cache key hashes the image's description and the bytes
//! of every file that goes in, so an unchanged image is never rebuilt, and
//! a changed binary always is.
//!
//! The images the cluster itself needs:
//! - [`pause`]: the pod sandbox, a tiny static C program (`e2e/images/pause.c`),
//! - [`workload`]: static busybox plus curl and mkfs.ext4 (with their
//!   libraries) for the tests' pods,
//! - [`from_binaries`]: any binaries on a minimal base — the twinvol image
//!   from our release binaries, and the CSI sidecars from the Go-built ones
//!   ([`twinvol`], [`sidecar`]).

use std::{
    collections::BTreeMap,
    fs,
    io::Write,
    path::{Path, PathBuf},
};

use sha2::{Digest, Sha256};

use crate::{HarnessError, UpstreamBinaries, cluster::cmd};

/// Bump when the archive layout changes: it changes every cache key.
const FORMAT: &str = "twinvol-image-v1";
/// The registry part of every image we make (never pulled from anywhere).
pub const REGISTRY: &str = "twinvol.local";

fn io_error(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> HarnessError {
    let path = path.to_owned();
    move |source| HarnessError::Io {
        action,
        path,
        source,
    }
}

#[derive(Debug, Clone)]
enum Entry {
    Dir { mode: u32 },
    File { source: Source, mode: u32 },
    Symlink { target: String },
}

#[derive(Debug, Clone)]
enum Source {
    Host(PathBuf),
    Bytes(Vec<u8>),
}

impl Source {
    fn read(&self) -> Result<Vec<u8>, HarnessError> {
        match self {
            Source::Host(path) => fs::read(path).map_err(io_error("reading", path)),
            Source::Bytes(bytes) => Ok(bytes.clone()),
        }
    }
}

/// What goes into one image.
#[derive(Debug, Clone)]
pub struct ImageSpec {
    reference: String,
    entrypoint: Option<Vec<String>>,
    cmd: Option<Vec<String>>,
    env: Vec<String>,
    entries: BTreeMap<String, Entry>,
}

/// An image archive on disk, ready to import.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuiltImage {
    /// `twinvol.local/name:tag`, as pods refer to it.
    pub reference: String,
    /// The docker-archive tarball.
    pub archive: PathBuf,
    /// The content key (hex), also in the archive's file name.
    pub key: String,
}

fn normalise(path: &str) -> String {
    path.trim_start_matches('/')
        .trim_end_matches('/')
        .to_owned()
}

impl ImageSpec {
    /// An empty image named `twinvol.local/<name>:<tag>`.
    pub fn new(name: &str, tag: &str) -> Self {
        let mut spec = Self {
            reference: format!("{REGISTRY}/{name}:{tag}"),
            entrypoint: None,
            cmd: None,
            env: vec!["PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin".to_owned()],
            entries: BTreeMap::new(),
        };
        spec.entries
            .insert("tmp".to_owned(), Entry::Dir { mode: 0o1777 });
        for dir in ["proc", "sys", "dev", "etc", "run", "var"] {
            spec.entries
                .insert(dir.to_owned(), Entry::Dir { mode: 0o755 });
        }
        spec
    }

    pub fn reference(&self) -> &str {
        &self.reference
    }

    pub fn entrypoint(mut self, args: &[&str]) -> Self {
        self.entrypoint = Some(args.iter().map(|a| (*a).to_owned()).collect());
        self
    }

    pub fn cmd(mut self, args: &[&str]) -> Self {
        self.cmd = Some(args.iter().map(|a| (*a).to_owned()).collect());
        self
    }

    /// A host file at `dest` in the image.
    pub fn file(mut self, source: &Path, dest: &str, mode: u32) -> Self {
        self.entries.insert(
            normalise(dest),
            Entry::File {
                source: Source::Host(source.to_owned()),
                mode,
            },
        );
        self
    }

    /// A file with `contents` at `dest`.
    pub fn bytes(mut self, contents: &[u8], dest: &str, mode: u32) -> Self {
        self.entries.insert(
            normalise(dest),
            Entry::File {
                source: Source::Bytes(contents.to_vec()),
                mode,
            },
        );
        self
    }

    pub fn symlink(mut self, dest: &str, target: &str) -> Self {
        self.entries.insert(
            normalise(dest),
            Entry::Symlink {
                target: target.to_owned(),
            },
        );
        self
    }

    /// An executable at `dest` and, when it is dynamically linked, the
    /// loader and every library `ldd` resolves for it, at their host paths.
    pub fn executable(mut self, source: &Path, dest: &str) -> Result<Self, HarnessError> {
        for library in shared_libraries(source)? {
            let dest = library.display().to_string();
            self = self.file(&library, &dest, 0o755);
        }
        Ok(self.file(source, dest, 0o755))
    }

    /// Every parent directory of every entry, as an entry of its own.
    fn with_parents(&self) -> BTreeMap<String, Entry> {
        let mut all = self.entries.clone();
        for path in self.entries.keys() {
            let mut parent = Path::new(path).parent();
            while let Some(p) = parent.filter(|p| !p.as_os_str().is_empty()) {
                all.entry(p.display().to_string())
                    .or_insert(Entry::Dir { mode: 0o755 });
                parent = p.parent();
            }
        }
        all
    }

    fn config_json(&self, diff_id: &str) -> Vec<u8> {
        let config = serde_json::json!({
            "architecture": "amd64",
            "os": "linux",
            "config": {
                "Env": self.env,
                "Entrypoint": self.entrypoint,
                "Cmd": self.cmd,
                "WorkingDir": "/",
            },
            "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{diff_id}")]},
        });
        config.to_string().into_bytes()
    }

    /// The content key: the description and every byte that goes in.
    fn key(&self, contents: &BTreeMap<String, Vec<u8>>) -> String {
        let mut hash = Sha256::new();
        hash.update(FORMAT);
        hash.update([0]);
        hash.update(&self.reference);
        hash.update(self.config_json("").as_slice());
        for (path, entry) in self.with_parents() {
            hash.update([0]);
            hash.update(&path);
            match entry {
                Entry::Dir { mode } => hash.update(format!("d{mode:o}")),
                Entry::Symlink { target } => hash.update(format!("l{target}")),
                Entry::File { mode, .. } => {
                    hash.update(format!("f{mode:o}"));
                    if let Some(bytes) = contents.get(&path) {
                        hash.update(Sha256::digest(bytes));
                    }
                }
            }
        }
        hex(&hash.finalize())
    }

    /// Builds the archive into `cache` (or finds it there already).
    pub fn build(&self, cache: &Path) -> Result<BuiltImage, HarnessError> {
        let mut contents = BTreeMap::new();
        for (path, entry) in &self.entries {
            if let Entry::File { source, .. } = entry {
                contents.insert(path.clone(), source.read()?);
            }
        }
        let key = self.key(&contents);
        let stem: String = self
            .reference
            .trim_start_matches(&format!("{REGISTRY}/"))
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        fs::create_dir_all(cache).map_err(io_error("creating", cache))?;
        let archive = cache.join(format!("{stem}-{}.tar", &key[..16]));
        let built = BuiltImage {
            reference: self.reference.clone(),
            archive: archive.clone(),
            key: key.clone(),
        };
        if archive.is_file() {
            return Ok(built);
        }
        let layer = self.layer(&contents)?;
        let diff_id = hex(&Sha256::digest(&layer));
        let config = self.config_json(&diff_id);
        let config_name = format!("{}.json", hex(&Sha256::digest(&config)));
        let manifest = serde_json::json!([{
            "Config": config_name,
            "RepoTags": [self.reference],
            "Layers": ["layer.tar"],
        }])
        .to_string()
        .into_bytes();
        let mut outer = tar::Builder::new(Vec::new());
        for (name, data) in [
            ("manifest.json", manifest.as_slice()),
            (config_name.as_str(), config.as_slice()),
            ("layer.tar", layer.as_slice()),
        ] {
            append_file(&mut outer, name, data, 0o644)?;
        }
        let bytes = outer.into_inner().map_err(io_error("writing", &archive))?;
        let tmp = archive.with_extension(format!("tmp{}", std::process::id()));
        let mut file = fs::File::create(&tmp).map_err(io_error("creating", &tmp))?;
        file.write_all(&bytes).map_err(io_error("writing", &tmp))?;
        drop(file);
        fs::rename(&tmp, &archive).map_err(io_error("renaming into place", &archive))?;
        Ok(built)
    }

    fn layer(&self, contents: &BTreeMap<String, Vec<u8>>) -> Result<Vec<u8>, HarnessError> {
        let mut layer = tar::Builder::new(Vec::new());
        let where_ = Path::new("(image layer)");
        for (path, entry) in self.with_parents() {
            match entry {
                Entry::Dir { mode } => {
                    let mut header = header(tar::EntryType::Directory, mode, 0);
                    layer
                        .append_data(&mut header, format!("{path}/"), std::io::empty())
                        .map_err(io_error("adding a directory to", where_))?;
                }
                Entry::Symlink { target } => {
                    let mut header = header(tar::EntryType::Symlink, 0o777, 0);
                    layer
                        .append_link(&mut header, &path, &target)
                        .map_err(io_error("adding a symlink to", where_))?;
                }
                Entry::File { mode, .. } => {
                    let data = contents.get(&path).map(Vec::as_slice).unwrap_or_default();
                    append_file(&mut layer, &path, data, mode)?;
                }
            }
        }
        layer
            .into_inner()
            .map_err(io_error("finishing the layer of", where_))
    }
}

fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut header = tar::Header::new_ustar();
    header.set_entry_type(kind);
    header.set_mode(mode);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(0);
    header.set_size(size);
    header
}

fn append_file(
    builder: &mut tar::Builder<Vec<u8>>,
    path: &str,
    data: &[u8],
    mode: u32,
) -> Result<(), HarnessError> {
    let mut header = header(tar::EntryType::Regular, mode, data.len() as u64);
    builder
        .append_data(&mut header, path, data)
        .map_err(io_error("adding a file to", Path::new(path)))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The loader and libraries `ldd` resolves for `binary` (none when static).
pub fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>, HarnessError> {
    let path = binary.display().to_string();
    let out = cmd::output("ldd", &[&path])?;
    // A static binary: ldd exits 1 saying "not a dynamic executable".
    if !out.status.success() {
        return Ok(Vec::new());
    }
    let mut libraries = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let line = line.trim();
        let candidate = match line.split_once("=>") {
            Some((_, rest)) => rest.trim(),
            None => line,
        };
        let candidate = candidate.split(" (").next().unwrap_or("").trim();
        if candidate.starts_with('/') {
            libraries.push(PathBuf::from(candidate));
        } else if line.contains("not found") {
            return Err(HarnessError::Cluster(format!(
                "{path} needs a library the host lacks: {line}"
            )));
        }
    }
    Ok(libraries)
}

/// Where built images and the pause program are cached.
pub fn cache_dir() -> PathBuf {
    std::env::var_os("TWINVOL_CACHE")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/twinvol"))
        .join("images")
}

/// The pause image (the sandbox every pod starts with).
pub const PAUSE: &str = "twinvol.local/pause:1";
/// The tests' workload image.
pub const WORKLOAD: &str = "twinvol.local/workload:1";

const PAUSE_SOURCE: &str = include_str!("../../images/pause.c");

/// The pause image: `e2e/images/pause.c`, compiled static with the host's gcc.
pub fn pause(cache: &Path) -> Result<BuiltImage, HarnessError> {
    let key = &hex(&Sha256::digest(PAUSE_SOURCE))[..16];
    let dir = cache.join(format!("pause-{key}"));
    let program = dir.join("pause");
    if !program.is_file() {
        fs::create_dir_all(&dir).map_err(io_error("creating", &dir))?;
        let source = dir.join("pause.c");
        fs::write(&source, PAUSE_SOURCE).map_err(io_error("writing", &source))?;
        let tmp = dir.join(format!("pause.tmp{}", std::process::id()));
        cmd::run(
            "gcc",
            &[
                "-static",
                "-Os",
                "-s",
                "-o",
                &tmp.display().to_string(),
                &source.display().to_string(),
            ],
        )?;
        fs::rename(&tmp, &program).map_err(io_error("renaming into place", &program))?;
    }
    let (name, tag) = split_reference(PAUSE);
    ImageSpec::new(name, tag)
        .file(&program, "/pause", 0o755)
        .entrypoint(&["/pause"])
        .build(cache)
}

fn split_reference(reference: &str) -> (&str, &str) {
    let rest = reference.trim_start_matches("twinvol.local/");
    rest.split_once(':').unwrap_or((rest, "latest"))
}

/// The workload image: static busybox (every applet under /bin), curl
/// (to call the API with a pod's token), mkfs.ext4 and util-linux's losetup
/// (`/usr/sbin/losetup`, which prints the device it attached), with their
/// libraries.
pub fn workload(cache: &Path) -> Result<BuiltImage, HarnessError> {
    let (name, tag) = split_reference(WORKLOAD);
    let mut spec = busybox(name, tag)?
        .executable(Path::new("/usr/bin/curl"), "/usr/bin/curl")?
        .executable(Path::new("/sbin/mke2fs"), "/sbin/mke2fs")?
        .executable(Path::new("/sbin/losetup"), "/usr/sbin/losetup")?
        .symlink("/sbin/mkfs.ext4", "mke2fs")
        .bytes(b"root:x:0:0:root:/:/bin/sh\n", "/etc/passwd", 0o644)
        .bytes(b"root:x:0:\n", "/etc/group", 0o644)
        .cmd(&["/bin/sh"]);
    if Path::new("/etc/mke2fs.conf").is_file() {
        spec = spec.file(Path::new("/etc/mke2fs.conf"), "/etc/mke2fs.conf", 0o644);
    }
    spec.build(cache)
}

/// `twinvol.local/<name>:<tag>` with the host's static busybox and every
/// applet of it linked under /bin.
fn busybox(name: &str, tag: &str) -> Result<ImageSpec, HarnessError> {
    let applets = cmd::run("/bin/busybox", &["--list"])?;
    let mut spec = ImageSpec::new(name, tag).file(Path::new("/bin/busybox"), "/bin/busybox", 0o755);
    for applet in applets.lines().map(str::trim).filter(|a| !a.is_empty()) {
        if applet != "busybox" {
            spec = spec.symlink(&format!("/bin/{applet}"), "busybox");
        }
    }
    Ok(spec)
}

/// Where Kubernetes' e2e suite looks for its test images when its
/// `KUBE_TEST_REPO_LIST` names this registry (see [`e2e_suite_image`]).
pub const E2E_SUITE_REGISTRY: &str = "twinvol.local/e2e-test-images";

/// An image the e2e suite (`e2e.test`) asks for, built here under the
/// name and tag it asks for (`twinvol.local/e2e-test-images/<name>:<tag>`):
/// `agnhost` is the release's agnhost binary (`agnhost`, Go-built from the
/// same k8s.io/kubernetes module) as `/agnhost`, its entrypoint, beside a
/// shell; `glibc-dns-testing` busybox with GNU dd and dash as /bin/sh; `busybox` and `nginx`
/// busybox alone, which is what the storage suites run in them (shell
/// commands: dd, md5sum, mount, ls, sleep).
/// Returns None for an image the storage suites do not run.
pub fn e2e_suite_image(
    cache: &Path,
    name: &str,
    tag: &str,
    agnhost: &Path,
) -> Result<Option<BuiltImage>, HarnessError> {
    let path = format!("e2e-test-images/{name}");
    let spec = match name {
        "agnhost" => busybox(&path, tag)?
            .file(agnhost, "/agnhost", 0o755)
            .entrypoint(&["/agnhost"])
            .cmd(&["pause"]),
        "busybox" | "nginx" => busybox(&path, tag)?.cmd(&["/bin/sh"]),
        // A glibc image upstream, whose dd is GNU's: the suites' block
        // tests write through it with `oflag=nocache`, which busybox's dd
        // lacks. The host's GNU dd (with glibc) takes /bin/dd's place, and
        // the host's dash /bin/sh's: busybox's own shell runs its dd
        // applet for `dd` whatever /bin/dd is (Debian builds it to prefer
        // its applets), which the full run of 2026-12-04 found.
        "glibc-dns-testing" => busybox(&path, tag)?
            .executable(Path::new("/usr/bin/dd"), "/bin/dd")?
            .executable(Path::new("/usr/bin/dash"), "/bin/sh")?
            .cmd(&["/bin/sh"]),
        _ => return Ok(None),
    };
    spec.bytes(b"root:x:0:0:root:/:/bin/sh\n", "/etc/passwd", 0o644)
        .bytes(b"root:x:0:\n", "/etc/group", 0o644)
        .build(cache)
        .map(Some)
}

/// The image with Debian's fio (`/usr/bin/fio` and its libraries) for the
/// tests that want a busy volume; not imported by default (80 MB).
pub const FIO: &str = "twinvol.local/fio:1";

/// The fio image: the host's `/usr/bin/fio` with its libraries.
pub fn fio(cache: &Path) -> Result<BuiltImage, HarnessError> {
    let (name, tag) = split_reference(FIO);
    ImageSpec::new(name, tag)
        .executable(Path::new("/usr/bin/fio"), "/usr/bin/fio")?
        .bytes(b"root:x:0:0:root:/:/bin/sh\n", "/etc/passwd", 0o644)
        .entrypoint(&["/usr/bin/fio"])
        .build(cache)
}

/// Binaries (placed in /usr/local/bin under their file names, with their
/// libraries) on a minimal base.
pub fn from_binaries(
    cache: &Path,
    name: &str,
    tag: &str,
    binaries: &[&Path],
    entrypoint: Option<&[&str]>,
) -> Result<BuiltImage, HarnessError> {
    let mut spec = ImageSpec::new(name, tag);
    for binary in binaries {
        let file = binary
            .file_name()
            .ok_or_else(|| HarnessError::Cluster(format!("{} is no file", binary.display())))?;
        let dest = format!("/usr/local/bin/{}", file.to_string_lossy());
        spec = spec.executable(binary, &dest)?;
    }
    if let Some(args) = entrypoint {
        spec = spec.entrypoint(args);
    }
    spec.build(cache)
}

/// The system tools the node plugin runs (by name, from PATH) to stage a
/// volume: host path and path in the image. A tool missing on the host
/// (mkfs.xfs without xfsprogs) is left out.
const NODE_TOOLS: [(&str, &str); 10] = [
    ("/usr/bin/mount", "/usr/bin/mount"),
    ("/usr/bin/umount", "/usr/bin/umount"),
    ("/usr/sbin/losetup", "/usr/sbin/losetup"),
    ("/usr/sbin/blkid", "/usr/sbin/blkid"),
    ("/usr/sbin/mke2fs", "/usr/sbin/mke2fs"),
    ("/usr/sbin/e2fsck", "/usr/sbin/e2fsck"),
    ("/usr/sbin/resize2fs", "/usr/sbin/resize2fs"),
    ("/usr/sbin/mkfs.xfs", "/usr/sbin/mkfs.xfs"),
    ("/usr/sbin/xfs_growfs", "/usr/sbin/xfs_growfs"),
    ("/usr/bin/fusermount3", "/usr/bin/fusermount3"),
];

/// The twinvol image `twinvol.local/twinvol:<tag>` from our release
/// binaries (e.g. `target/release/twinvol-engine`), with the system tools
/// the node plugin runs to stage volumes (mount, losetup, blkid, mkfs,
/// fsck, resize) and their libraries.
pub fn twinvol(cache: &Path, tag: &str, binaries: &[&Path]) -> Result<BuiltImage, HarnessError> {
    let mut spec = ImageSpec::new("twinvol", tag);
    // Stripped copies (the release profile keeps line tables: 270 MB of
    // image instead of 80, imported into every node): private temporary
    // files, so that concurrent tests do not race on one path; kept until
    // the image is built.
    let mut stripped = Vec::new();
    for binary in binaries {
        let file = binary
            .file_name()
            .ok_or_else(|| HarnessError::Cluster(format!("{} is no file", binary.display())))?;
        let dest = format!("/usr/local/bin/{}", file.to_string_lossy());
        fs::create_dir_all(cache).map_err(io_error("creating", cache))?;
        let copy = tempfile::Builder::new()
            .prefix(".strip-")
            .tempfile_in(cache)
            .map_err(io_error("creating a temporary file in", cache))?;
        let ok = std::process::Command::new("strip")
            .arg("-o")
            .arg(copy.path())
            .arg(binary)
            .status()
            .is_ok_and(|s| s.success())
            && {
                use std::os::unix::fs::PermissionsExt;
                fs::set_permissions(copy.path(), fs::Permissions::from_mode(0o755)).is_ok()
            };
        let source = if ok {
            copy.path().to_owned()
        } else {
            binary.to_path_buf()
        };
        spec = spec.executable(&source, &dest)?;
        stripped.push(copy);
    }
    for (host, dest) in NODE_TOOLS {
        if Path::new(host).is_file() {
            spec = spec.executable(Path::new(host), dest)?;
        }
    }
    spec = spec
        .symlink("/usr/sbin/mkfs.ext4", "mke2fs")
        .symlink("/usr/sbin/fsck.ext4", "e2fsck")
        .symlink("/usr/bin/fusermount", "fusermount3")
        .bytes(b"root:x:0:0:root:/:/bin/sh\n", "/etc/passwd", 0o644)
        .bytes(b"root:x:0:\n", "/etc/group", 0o644)
        .symlink("/etc/mtab", "/proc/self/mounts");
    if Path::new("/etc/mke2fs.conf").is_file() {
        spec = spec.file(Path::new("/etc/mke2fs.conf"), "/etc/mke2fs.conf", 0o644);
    }
    let built = spec.build(cache);
    drop(stripped);
    built
}

/// A CSI sidecar's image from its Go-built binary (`csi-provisioner`,
/// `csi-attacher`, `csi-resizer`): `twinvol.local/<binary>:<version>`,
/// entrypoint the binary.
pub fn sidecar(
    cache: &Path,
    upstream: &UpstreamBinaries,
    binary: &'static str,
    version: &str,
) -> Result<BuiltImage, HarnessError> {
    let path = upstream.get(binary)?;
    let entry = format!("/usr/local/bin/{binary}");
    from_binaries(cache, binary, version, &[&path], Some(&[&entry]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries_of(archive: &Path) -> BTreeMap<String, Vec<u8>> {
        let bytes = fs::read(archive).expect("archive readable");
        let mut outer = tar::Archive::new(bytes.as_slice());
        let mut files = BTreeMap::new();
        for entry in outer.entries().expect("entries") {
            let mut entry = entry.expect("entry");
            let path = entry.path().expect("path").display().to_string();
            let mut data = Vec::new();
            std::io::Read::read_to_end(&mut entry, &mut data).expect("reads");
            files.insert(path, data);
        }
        files
    }

    #[test]
    fn an_image_is_a_docker_archive_with_its_config_and_layer() {
        let cache = tempfile::tempdir().expect("temp dir");
        let built = ImageSpec::new("demo", "1")
            .bytes(b"hello", "/etc/greeting", 0o644)
            .symlink("/bin/sh", "busybox")
            .entrypoint(&["/bin/sh"])
            .build(cache.path())
            .expect("builds");
        assert_eq!(built.reference, "twinvol.local/demo:1");
        let outer = entries_of(&built.archive);
        let manifest: serde_json::Value =
            serde_json::from_slice(&outer["manifest.json"]).expect("manifest JSON");
        assert_eq!(manifest[0]["RepoTags"][0], "twinvol.local/demo:1");
        let config_name = manifest[0]["Config"].as_str().expect("config name");
        let config: serde_json::Value =
            serde_json::from_slice(&outer[config_name]).expect("config JSON");
        let layer = &outer["layer.tar"];
        assert_eq!(
            config["rootfs"]["diff_ids"][0],
            format!("sha256:{}", hex(&Sha256::digest(layer)))
        );
        let mut archive = tar::Archive::new(layer.as_slice());
        let mut paths = Vec::new();
        for entry in archive.entries().expect("entries") {
            let entry = entry.expect("entry");
            assert_eq!(entry.header().mtime().expect("mtime"), 0);
            paths.push(entry.path().expect("path").display().to_string());
        }
        assert!(paths.contains(&"etc/greeting".to_owned()), "{paths:?}");
        assert!(paths.contains(&"bin/".to_owned()), "{paths:?}");
    }

    #[test]
    fn the_cache_key_follows_the_content() {
        let cache = tempfile::tempdir().expect("temp dir");
        let src = cache.path().join("payload");
        fs::write(&src, b"one").expect("writes");
        let first = ImageSpec::new("demo", "1")
            .file(&src, "/payload", 0o644)
            .build(cache.path())
            .expect("builds");
        let again = ImageSpec::new("demo", "1")
            .file(&src, "/payload", 0o644)
            .build(cache.path())
            .expect("builds");
        assert_eq!(first, again, "same content, same archive");
        fs::write(&src, b"two").expect("writes");
        let changed = ImageSpec::new("demo", "1")
            .file(&src, "/payload", 0o644)
            .build(cache.path())
            .expect("builds");
        assert_ne!(first.key, changed.key);
        assert_ne!(first.archive, changed.archive);
    }

    #[test]
    fn a_dynamic_executable_brings_its_loader_and_libraries() {
        let libraries = shared_libraries(Path::new("/usr/bin/curl")).expect("ldd runs");
        assert!(
            libraries
                .iter()
                .any(|l| l.display().to_string().contains("ld-linux")),
            "{libraries:?}"
        );
        assert!(
            libraries
                .iter()
                .any(|l| l.display().to_string().contains("libcurl")),
            "{libraries:?}"
        );
        assert!(
            shared_libraries(Path::new("/bin/busybox"))
                .expect("ldd runs")
                .is_empty(),
            "busybox-static is static"
        );
    }
}
