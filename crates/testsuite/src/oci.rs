//! OCI images without a network: layer tars built in memory, an OCI image
//! layout on disk, its tar for `ctr images import`, and the import itself.
//!
//! ```no_run
//! use testsuite::oci::{self, Compression, ImageSpec, LayerBuilder};
//! # fn main() -> anyhow::Result<()> {
//! let mut top = LayerBuilder::new();
//! top.file("etc/motd", 0o644, b"hello\n")
//!     .whiteout("bin/rm")        // removes /bin/rm of a lower layer
//!     .opaque("var/cache");      // hides everything below /var/cache
//! let spec = ImageSpec::new("two-layers")
//!     .layer(oci::busybox_base_layer()?, Compression::Gzip)
//!     .layer(top.finish()?, Compression::None)
//!     .cmd(&["/bin/sh"]);
//! let dir = tempfile::tempdir()?;
//! let archive = oci::build_archive(&spec, dir.path())?;
//! println!("{} at {}", archive.name, archive.path.display());
//! # Ok(())
//! # }
//! ```

use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use erofs_image::tar::{Entry, EntryKind, TarWriter};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::containerd::Containerd;

/// Media type of an OCI image manifest.
pub const MEDIA_TYPE_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// Media type of an OCI image index.
pub const MEDIA_TYPE_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// Media type of an OCI image config.
pub const MEDIA_TYPE_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// Annotation naming an image in an image layout's `index.json`.
pub const ANNOTATION_REF_NAME: &str = "org.opencontainers.image.ref.name";
/// containerd's own image-name annotation (what `ctr images export` writes).
pub const ANNOTATION_CONTAINERD_NAME: &str = "io.containerd.image.name";

/// The modification time given to every entry the builders write.
pub const FIXED_MTIME: i64 = 1_700_000_000;

/// Compression of a layer blob: the library's type ([`Compression::compress`] compresses a
/// blob), with [`media_type`] for its OCI layer media type.
pub use erofs_image::compression::Compression;

/// The OCI layer media type of a tar blob with compression `c`. Spelled out here rather than
/// taken from the snapshotter: the harness checks the differ against the OCI names.
pub fn media_type(c: Compression) -> &'static str {
    match c {
        Compression::None => "application/vnd.oci.image.layer.v1.tar",
        Compression::Gzip => "application/vnd.oci.image.layer.v1.tar+gzip",
        Compression::Zstd => "application/vnd.oci.image.layer.v1.tar+zstd",
    }
}

/// Builds a layer tar in memory with `erofs_image::tar::TarWriter`.
///
/// Paths are relative (`etc/motd`); entries are owned by root with mtime
/// [`FIXED_MTIME`]. Methods chain; the first I/O error is reported by
/// [`finish`](Self::finish).
#[derive(Debug)]
pub struct LayerBuilder {
    writer: TarWriter<Vec<u8>>,
    error: Option<io::Error>,
}

impl Default for LayerBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl LayerBuilder {
    /// An empty layer.
    pub fn new() -> Self {
        LayerBuilder {
            writer: TarWriter::new(Vec::new()),
            error: None,
        }
    }

    fn base(path: &str, kind: EntryKind, mode: u32) -> Entry {
        let mut e = Entry::new(path.trim_start_matches('/').as_bytes().to_vec(), kind);
        e.mode = mode;
        e.mtime = FIXED_MTIME;
        e
    }

    /// Appends any entry (`data` is the content of a regular file).
    pub fn entry(&mut self, entry: &Entry, data: &[u8]) -> &mut Self {
        if self.error.is_none()
            && let Err(e) = self.writer.append_bytes(entry, data)
        {
            self.error = Some(e);
        }
        self
    }

    /// A directory.
    pub fn dir(&mut self, path: &str, mode: u32) -> &mut Self {
        let e = Self::base(path, EntryKind::Directory, mode);
        self.entry(&e, &[])
    }

    /// A regular file.
    pub fn file(&mut self, path: &str, mode: u32, data: &[u8]) -> &mut Self {
        let e = Self::base(path, EntryKind::Regular, mode);
        self.entry(&e, data)
    }

    /// A symbolic link to `target`.
    pub fn symlink(&mut self, path: &str, target: &str) -> &mut Self {
        let mut e = Self::base(path, EntryKind::Symlink, 0o777);
        e.link = target.as_bytes().to_vec();
        self.entry(&e, &[])
    }

    /// A hard link to the earlier entry `target` (a relative archive path).
    pub fn hardlink(&mut self, path: &str, target: &str) -> &mut Self {
        let mut e = Self::base(path, EntryKind::Hardlink, 0o644);
        e.link = target.trim_start_matches('/').as_bytes().to_vec();
        self.entry(&e, &[])
    }

    /// An OCI whiteout deleting `path` of the lower layers: an empty file
    /// `dir/.wh.name`.
    pub fn whiteout(&mut self, path: &str) -> &mut Self {
        let path = path.trim_matches('/');
        let (dir, name) = match path.rsplit_once('/') {
            Some((d, n)) => (format!("{d}/"), n),
            None => (String::new(), path),
        };
        let e = Self::base(&format!("{dir}.wh.{name}"), EntryKind::Regular, 0o644);
        self.entry(&e, &[])
    }

    /// An OCI opaque-directory marker `dir/.wh..wh..opq`: the lower layers'
    /// contents of `dir` are hidden.
    pub fn opaque(&mut self, dir: &str) -> &mut Self {
        let dir = dir.trim_matches('/');
        let path = if dir.is_empty() {
            ".wh..wh..opq".to_owned()
        } else {
            format!("{dir}/.wh..wh..opq")
        };
        let e = Self::base(&path, EntryKind::Regular, 0o644);
        self.entry(&e, &[])
    }

    /// Writes the end-of-archive marker and returns the tar bytes.
    pub fn finish(self) -> Result<Vec<u8>> {
        if let Some(e) = self.error {
            return Err(e).context("building a layer tar");
        }
        Ok(self.writer.finish()?)
    }
}

/// The busybox applets linked into `/bin` when `busybox --list` cannot be run.
const FALLBACK_APPLETS: &[&str] = &[
    "sh",
    "ash",
    "ls",
    "cat",
    "echo",
    "mkdir",
    "rm",
    "rmdir",
    "touch",
    "sleep",
    "mount",
    "umount",
    "ps",
    "true",
    "false",
    "test",
    "[",
    "env",
    "id",
    "grep",
    "sed",
    "head",
    "tail",
    "wc",
    "stat",
    "find",
    "sync",
    "uname",
    "df",
    "du",
    "chmod",
    "chown",
    "ln",
    "mv",
    "cp",
    "readlink",
    "hostname",
    "date",
    "sort",
    "uniq",
    "tr",
    "cut",
    "xargs",
    "md5sum",
    "sha256sum",
    "dd",
    "printf",
    "kill",
    "seq",
    "tee",
    "which",
    "whoami",
    "stty",
    "less",
    "more",
    "vi",
];

/// A base layer around the host's static busybox: `/bin/busybox` (from
/// `/bin/busybox`), `/bin/<applet>` symlinks to it (`sh`, `ls`, `cat`,
/// `echo`, ... as listed by `busybox --list`), `/etc/passwd` and `/etc/group`
/// with root, and the directories `/proc /sys /dev /tmp (1777) /etc /root
/// (0700) /var /usr`.
pub fn busybox_base_layer() -> Result<Vec<u8>> {
    busybox_base_layer_from(Path::new("/bin/busybox"))
}

/// [`busybox_base_layer`] with another (static) busybox binary.
pub fn busybox_base_layer_from(busybox: &Path) -> Result<Vec<u8>> {
    let bin = fs::read(busybox).with_context(|| format!("read {}", busybox.display()))?;
    let mut applets: Vec<String> = Command::new(busybox)
        .arg("--list")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .map(str::trim)
                .filter(|a| !a.is_empty() && *a != "busybox" && !a.contains('/'))
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default();
    if applets.is_empty() {
        applets = FALLBACK_APPLETS.iter().map(|s| s.to_string()).collect();
    }
    for must in ["sh", "ls", "cat", "echo"] {
        if !applets.iter().any(|a| a == must) {
            bail!("{} has no {must} applet", busybox.display());
        }
    }
    applets.sort();
    applets.dedup();
    let mut l = LayerBuilder::new();
    l.dir("bin", 0o755).file("bin/busybox", 0o755, &bin);
    for a in &applets {
        l.symlink(&format!("bin/{a}"), "/bin/busybox");
    }
    l.dir("dev", 0o755)
        .dir("etc", 0o755)
        .file(
            "etc/passwd",
            0o644,
            b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
        )
        .file("etc/group", 0o644, b"root:x:0:\nnogroup:x:65534:\n")
        .dir("proc", 0o555)
        .dir("root", 0o700)
        .dir("sys", 0o555)
        .dir("tmp", 0o1777)
        .dir("usr", 0o755)
        .dir("var", 0o755);
    l.finish()
}

/// What to put in an image.
#[derive(Debug, Clone)]
pub struct ImageSpec {
    /// Repository, e.g. `docker.io/testsuite/two-layers`.
    pub repo: String,
    /// Tag, e.g. `latest`.
    pub tag: String,
    /// Layers, bottom first: uncompressed tar and the compression of its blob.
    pub layers: Vec<(Vec<u8>, Compression)>,
    /// `config.Cmd`.
    pub cmd: Option<Vec<String>>,
    /// `config.Entrypoint`.
    pub entrypoint: Option<Vec<String>>,
    /// `config.Env` (default: a `PATH`).
    pub env: Vec<String>,
    /// `config.Volumes` (the image's `VOLUME` entries).
    pub volumes: Vec<String>,
    /// `architecture` (default `amd64`).
    pub architecture: String,
    /// `os` (default `linux`).
    pub os: String,
}

impl ImageSpec {
    /// An image without layers. `name` may be a bare name (`foo`, which
    /// becomes `docker.io/testsuite/foo:latest`), a repository with a host
    /// (`127.0.0.1:5000/x/foo`), and may carry a `:tag`.
    pub fn new(name: &str) -> Self {
        let (repo, tag) = split_tag(name);
        let repo = if repo.contains('/') {
            repo.to_owned()
        } else {
            format!("docker.io/testsuite/{repo}")
        };
        ImageSpec {
            repo,
            tag: tag.unwrap_or("latest").to_owned(),
            layers: Vec::new(),
            cmd: None,
            entrypoint: None,
            env: vec![
                "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_owned(),
            ],
            volumes: Vec::new(),
            architecture: "amd64".to_owned(),
            os: "linux".to_owned(),
        }
    }

    /// Adds a layer on top.
    pub fn layer(mut self, tar: Vec<u8>, compression: Compression) -> Self {
        self.layers.push((tar, compression));
        self
    }

    /// Sets `config.Cmd`.
    pub fn cmd(mut self, cmd: &[&str]) -> Self {
        self.cmd = Some(cmd.iter().map(|s| s.to_string()).collect());
        self
    }

    /// Sets `config.Entrypoint`.
    pub fn entrypoint(mut self, ep: &[&str]) -> Self {
        self.entrypoint = Some(ep.iter().map(|s| s.to_string()).collect());
        self
    }

    /// Adds a `VOLUME` (`config.Volumes`).
    pub fn volume(mut self, path: &str) -> Self {
        self.volumes.push(path.to_owned());
        self
    }

    /// `repo:tag`.
    pub fn name(&self) -> String {
        format!("{}:{}", self.repo, self.tag)
    }
}

/// Splits `repo[:tag]`, ignoring a `:port` in the host part.
fn split_tag(name: &str) -> (&str, Option<&str>) {
    let last_slash = name.rfind('/').map(|i| i + 1).unwrap_or(0);
    match name[last_slash..].rfind(':') {
        Some(i) => (&name[..last_slash + i], Some(&name[last_slash + i + 1..])),
        None => (name, None),
    }
}

/// A blob of the image layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blob {
    /// `sha256:<hex>`.
    pub digest: String,
    /// Size in bytes.
    pub size: u64,
    /// Media type.
    pub media_type: String,
}

impl Blob {
    /// The OCI descriptor JSON.
    pub fn descriptor(&self) -> Value {
        json!({"mediaType": self.media_type, "digest": self.digest, "size": self.size})
    }
}

/// One layer of a built image.
#[derive(Debug, Clone)]
pub struct LayerBlob {
    /// The (compressed) blob.
    pub blob: Blob,
    /// `sha256:` of the uncompressed tar (`rootfs.diff_ids`).
    pub diff_id: String,
    /// How the blob is compressed.
    pub compression: Compression,
}

/// A built image: an OCI image layout directory and its tar.
#[derive(Debug, Clone)]
pub struct OciArchive {
    /// The image layout as a tar, for `ctr images import`.
    pub path: PathBuf,
    /// The image layout directory (`oci-layout`, `index.json`, `blobs/sha256/*`).
    pub layout_dir: PathBuf,
    /// Image reference, `repo:tag`: the name `ctr` knows it by after import.
    pub name: String,
    /// Repository part of `name`.
    pub repo: String,
    /// Tag part of `name`.
    pub tag: String,
    /// The manifest blob.
    pub manifest: Blob,
    /// The config blob.
    pub config: Blob,
    /// Layers, bottom first.
    pub layers: Vec<LayerBlob>,
}

impl OciArchive {
    /// Path of a blob in the layout directory.
    pub fn blob_path(&self, digest: &str) -> PathBuf {
        blob_path(&self.layout_dir, digest)
    }

    /// The chain id of the top layer (what snapshotters name committed layers).
    pub fn chain_id(&self) -> String {
        chain_ids(
            &self
                .layers
                .iter()
                .map(|l| l.diff_id.clone())
                .collect::<Vec<_>>(),
        )
        .pop()
        .unwrap_or_default()
    }
}

/// `sha256:<hex>` of `data`.
pub fn sha256_digest(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// The sha256 of the file at `path`, in hex (no `sha256:` prefix).
pub fn sha256_file(path: &Path) -> Result<String> {
    let f = File::open(path).with_context(|| path.display().to_string())?;
    sha256_reader(f).with_context(|| format!("reading {}", path.display()))
}

/// The sha256 of everything `r` yields, in hex, read in 1 MiB pieces.
pub fn sha256_reader(mut r: impl io::Read) -> io::Result<String> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// Chain ids of a stack of diff ids (OCI image spec: `ChainID(L0) = DiffID(L0)`,
/// `ChainID(Ln) = sha256(ChainID(Ln-1) + " " + DiffID(Ln))`).
pub fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for d in diff_ids {
        let next = match out.last() {
            None => d.clone(),
            Some(prev) => sha256_digest(format!("{prev} {d}").as_bytes()),
        };
        out.push(next);
    }
    out
}

fn blob_path(layout: &Path, digest: &str) -> PathBuf {
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    layout.join("blobs/sha256").join(hex)
}

fn write_blob(layout: &Path, data: &[u8], media_type: &str) -> Result<Blob> {
    let digest = sha256_digest(data);
    fs::write(blob_path(layout, &digest), data)?;
    Ok(Blob {
        digest,
        size: data.len() as u64,
        media_type: media_type.to_owned(),
    })
}

/// Writes the image layout of `spec` to `out_dir/<name>.oci/` and its tar to
/// `out_dir/<name>.tar` (`<name>` is the reference with unsafe characters
/// replaced).
pub fn build_archive(spec: &ImageSpec, out_dir: &Path) -> Result<OciArchive> {
    let name = spec.name();
    let safe: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let layout = out_dir.join(format!("{safe}.oci"));
    let tar_path = out_dir.join(format!("{safe}.tar"));
    if layout.exists() {
        fs::remove_dir_all(&layout)?;
    }
    fs::create_dir_all(layout.join("blobs/sha256"))?;
    fs::write(
        layout.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )?;

    let mut layers = Vec::new();
    for (tar, compression) in &spec.layers {
        let blob = write_blob(
            &layout,
            &compression.compress(tar)?,
            media_type(*compression),
        )?;
        layers.push(LayerBlob {
            blob,
            diff_id: sha256_digest(tar),
            compression: *compression,
        });
    }
    let mut cfg = serde_json::Map::new();
    cfg.insert("Env".into(), json!(spec.env));
    if let Some(cmd) = &spec.cmd {
        cfg.insert("Cmd".into(), json!(cmd));
    }
    if let Some(ep) = &spec.entrypoint {
        cfg.insert("Entrypoint".into(), json!(ep));
    }
    if !spec.volumes.is_empty() {
        let v: serde_json::Map<String, Value> = spec
            .volumes
            .iter()
            .map(|p| (p.clone(), json!({})))
            .collect();
        cfg.insert("Volumes".into(), Value::Object(v));
    }
    cfg.insert("WorkingDir".into(), json!("/"));
    let config = json!({
        "created": "2023-11-14T22:13:20Z",
        "architecture": spec.architecture,
        "os": spec.os,
        "config": Value::Object(cfg),
        "rootfs": {
            "type": "layers",
            "diff_ids": layers.iter().map(|l| l.diff_id.clone()).collect::<Vec<_>>(),
        },
        "history": layers.iter().enumerate()
            .map(|(i, _)| json!({"created": "2023-11-14T22:13:20Z", "created_by": format!("testsuite layer {i}")}))
            .collect::<Vec<_>>(),
    });
    let config = write_blob(&layout, &serde_json::to_vec(&config)?, MEDIA_TYPE_CONFIG)?;
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_TYPE_MANIFEST,
        "config": config.descriptor(),
        "layers": layers.iter().map(|l| l.blob.descriptor()).collect::<Vec<_>>(),
    });
    let manifest = write_blob(
        &layout,
        &serde_json::to_vec(&manifest)?,
        MEDIA_TYPE_MANIFEST,
    )?;
    let mut desc = manifest.descriptor();
    desc["platform"] = json!({"architecture": spec.architecture, "os": spec.os});
    desc["annotations"] = json!({
        ANNOTATION_REF_NAME: name,
        ANNOTATION_CONTAINERD_NAME: name,
    });
    let index = json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_TYPE_INDEX,
        "manifests": [desc],
    });
    fs::write(layout.join("index.json"), serde_json::to_vec(&index)?)?;
    tar_layout(&layout, &tar_path)?;
    Ok(OciArchive {
        path: tar_path,
        layout_dir: layout,
        name,
        repo: spec.repo.clone(),
        tag: spec.tag.clone(),
        manifest,
        config,
        layers,
    })
}

/// Writes the layout directory as a tar (`oci-layout`, `index.json`, `blobs/`).
fn tar_layout(layout: &Path, out: &Path) -> Result<()> {
    let f = BufWriter::new(File::create(out)?);
    let mut w = TarWriter::new(f);
    let file = |w: &mut TarWriter<BufWriter<File>>, rel: &str| -> Result<()> {
        let path = layout.join(rel);
        let mut src = File::open(&path)?;
        let mut e = Entry::new(rel.as_bytes().to_vec(), EntryKind::Regular);
        e.size = src.metadata()?.len();
        e.mtime = FIXED_MTIME;
        w.append(&e, &mut src)?;
        Ok(())
    };
    file(&mut w, "oci-layout")?;
    file(&mut w, "index.json")?;
    for d in ["blobs", "blobs/sha256"] {
        let mut e = Entry::new(d.as_bytes().to_vec(), EntryKind::Directory);
        e.mtime = FIXED_MTIME;
        w.append_bytes(&e, &[])?;
    }
    let mut names: Vec<String> = fs::read_dir(layout.join("blobs/sha256"))?
        .map(|e| Ok(e?.file_name().to_string_lossy().into_owned()))
        .collect::<io::Result<_>>()?;
    names.sort();
    for n in names {
        file(&mut w, &format!("blobs/sha256/{n}"))?;
    }
    w.finish()?.flush()?;
    Ok(())
}

/// How to import.
#[derive(Debug, Clone)]
pub struct ImportOpts {
    /// Snapshotter to unpack into (`--snapshotter`).
    pub snapshotter: String,
    /// `--no-unpack`: only load the content and the image record.
    pub no_unpack: bool,
    /// `--local` (2.x): import in the client (through the content, diff and
    /// snapshot services) instead of the transfer service.
    pub local: bool,
    /// More flags.
    pub flags: Vec<String>,
}

impl ImportOpts {
    /// Import and unpack into `snapshotter`.
    pub fn new(snapshotter: &str) -> Self {
        ImportOpts {
            snapshotter: snapshotter.to_owned(),
            no_unpack: false,
            local: false,
            flags: Vec::new(),
        }
    }
}

/// The `ctr images import` arguments for `archive` on `version` (after `ctr`).
///
/// Both versions: `images import --base-name REPO --snapshotter S ARCHIVE`.
/// `--base-name` keeps only images named `REPO:*` and names them by the
/// `org.opencontainers.image.ref.name` annotation. The platform of the manifest
/// descriptor is `linux/amd64`, so no `--all-platforms` is needed.
pub fn import_args(
    version: crate::Version,
    archive: &OciArchive,
    opts: &ImportOpts,
) -> Result<Vec<String>> {
    let mut a: Vec<String> = vec!["images".into(), "import".into()];
    a.extend(["--base-name".into(), archive.repo.clone()]);
    a.extend(["--snapshotter".into(), opts.snapshotter.clone()]);
    if opts.no_unpack {
        a.push("--no-unpack".into());
    }
    if opts.local {
        if !version.transfer_service() {
            bail!("--local exists only in ctr 2.x (1.6 always imports in the client)");
        }
        a.push("--local".into());
    }
    a.extend(opts.flags.iter().cloned());
    let path = fs::canonicalize(&archive.path)?;
    a.push(path.to_string_lossy().into_owned());
    Ok(a)
}

/// `ctr images import` of `archive`, unpacked into `snapshotter`; checks that
/// the image is then listed under [`OciArchive::name`].
pub fn import(ctd: &Containerd, archive: &OciArchive, snapshotter: &str) -> Result<()> {
    import_with(ctd, archive, &ImportOpts::new(snapshotter))
}

/// [`import`] with options.
pub fn import_with(ctd: &Containerd, archive: &OciArchive, opts: &ImportOpts) -> Result<()> {
    let args = import_args(ctd.version(), archive, opts)?;
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = ctd.ctr(&args)?;
    ctd.check(&out, &format!("ctr {}", args.join(" ")))?;
    let images = ctd.images()?;
    if !images.contains(&archive.name) {
        bail!(
            "after import, {} is not among the images {images:?}; import said:\n{}{}",
            archive.name,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_tags() {
        assert_eq!(split_tag("a/b:c"), ("a/b", Some("c")));
        assert_eq!(
            split_tag("127.0.0.1:5000/x/y"),
            ("127.0.0.1:5000/x/y", None)
        );
        assert_eq!(
            split_tag("127.0.0.1:5000/x/y:t"),
            ("127.0.0.1:5000/x/y", Some("t"))
        );
        assert_eq!(
            ImageSpec::new("foo").name(),
            "docker.io/testsuite/foo:latest"
        );
    }

    #[test]
    fn chain_ids_follow_the_spec() {
        let d = vec!["sha256:a".to_owned(), "sha256:b".to_owned()];
        let c = chain_ids(&d);
        assert_eq!(c[0], "sha256:a");
        assert_eq!(c[1], sha256_digest(b"sha256:a sha256:b"));
    }

    #[test]
    fn whiteout_names() {
        let mut l = LayerBuilder::new();
        l.whiteout("etc/group").whiteout("top").opaque("var/cache");
        let tar = l.finish().unwrap();
        let mut r = erofs_image::tar::TarReader::new(&tar[..]);
        let mut names = Vec::new();
        while let Some(e) = r.next_entry().unwrap() {
            names.push(e.display_path());
        }
        assert_eq!(
            names,
            ["etc/.wh.group", ".wh.top", "var/cache/.wh..wh..opq"]
        );
    }

    #[test]
    fn archive_layout() {
        let dir = tempfile::tempdir().unwrap();
        let mut l = LayerBuilder::new();
        l.file("a", 0o644, b"x");
        let spec = ImageSpec::new("t")
            .layer(l.finish().unwrap(), Compression::Gzip)
            .cmd(&["/bin/sh"]);
        let a = build_archive(&spec, dir.path()).unwrap();
        let index: Value =
            serde_json::from_slice(&fs::read(a.layout_dir.join("index.json")).unwrap()).unwrap();
        assert_eq!(index["manifests"][0]["digest"], a.manifest.digest);
        assert_eq!(
            index["manifests"][0]["annotations"][ANNOTATION_REF_NAME],
            "docker.io/testsuite/t:latest"
        );
        let m = fs::read(a.blob_path(&a.manifest.digest)).unwrap();
        assert_eq!(sha256_digest(&m), a.manifest.digest);
        assert!(a.path.metadata().unwrap().len() > 0);
    }
}
