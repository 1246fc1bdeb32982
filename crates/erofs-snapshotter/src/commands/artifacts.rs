//! `artifacts build|push|ls|keygen` and `verify`: layer artifacts for a registry (format in
//! `erofs_registry::artifacts`), and the guest-side diffID check of a tar-index layer.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail, ensure};
use erofs_image::compression::{BombGuard, Decompressed};
use erofs_registry::artifacts::{
    self, ARTIFACT_TYPE, ArtifactSet, Descriptor, EMPTY_BLOB, LayerArtifacts,
    MEDIA_TYPE_DMVERITY_TREE, MEDIA_TYPE_DOCKER_LIST, MEDIA_TYPE_OCI_INDEX, MEDIA_TYPE_TAR_INDEX,
    Manifest, SCHEME_ED25519, SignatureBlob, TarIndexBlob, TreeBlob,
};
use erofs_registry::client::{Client, ClientOptions, Credentials, ReferrersVia};
use erofs_registry::signature::{PublicKey, SecretKey};
use erofs_registry::tls::{ClientCert, TlsOptions};
use erofs_registry::{Reference, artifacts::check_digest};
use snapshotter::diff::{LayerType, MkfsOptions, Pipeline, layer_type};
use snapshotter::integrity::dmverity;

use crate::cli::{
    ArtifactsBuildArgs, ArtifactsCommand, ArtifactsLsArgs, ArtifactsPushArgs, KeygenArgs,
    RegistryArgs, VerifyArgs,
};

/// Largest config blob read.
const MAX_CONFIG: u64 = 16 << 20;
/// Largest artifact blob `ls` reads into memory (signatures only).
const MAX_SIGNATURE: u64 = 64 << 10;

pub fn run(c: ArtifactsCommand) -> Result<ExitCode> {
    match c {
        ArtifactsCommand::Build(a) => build(a),
        ArtifactsCommand::Push(a) => push(a),
        ArtifactsCommand::Ls(a) => ls(a),
        ArtifactsCommand::Keygen(a) => keygen(a),
    }
}

fn client(host: &str, r: &RegistryArgs) -> Result<Client> {
    let credentials = match &r.username {
        Some(u) => Some(Credentials::Basic {
            username: u.clone(),
            password: std::env::var("EROFS_REGISTRY_PASSWORD")
                .context("--username needs the password in EROFS_REGISTRY_PASSWORD")?,
        }),
        None => None,
    };
    let scheme = if r.plain_http { "http" } else { "https" };
    let tls = TlsOptions {
        ca_files: r.ca.clone(),
        client_certs: r
            .cert
            .iter()
            .map(|cert| ClientCert {
                cert: cert.clone(),
                key: r.key.clone(),
            })
            .collect(),
        skip_verify: r.skip_verify,
    };
    // --skip-verify: erofs_registry logs the warning (once per host) when it connects.
    Ok(Client::new(
        &format!("{scheme}://{host}"),
        ClientOptions {
            credentials,
            tls,
            ..ClientOptions::default()
        },
    )?)
}

fn platform(r: &RegistryArgs) -> Result<(String, String)> {
    match &r.platform {
        Some(p) => {
            let (os, arch) = p
                .split_once('/')
                .with_context(|| format!("--platform {p:?} is not OS/ARCH"))?;
            Ok((os.to_string(), arch.to_string()))
        }
        None => {
            let arch = match std::env::consts::ARCH {
                "x86_64" => "amd64",
                "aarch64" => "arm64",
                "powerpc64" => "ppc64le",
                a => a,
            };
            Ok(("linux".into(), arch.into()))
        }
    }
}

/// An image whose blobs are files under `dir/blobs/sha256/`.
struct LocalImage {
    dir: PathBuf,
    /// The image manifest's descriptor (the referrers' subject).
    subject: Descriptor,
    manifest: Manifest,
}

impl LocalImage {
    fn blob(&self, digest: &str) -> Result<PathBuf> {
        check_digest(digest)?;
        Ok(self.dir.join("blobs/sha256").join(&digest[7..]))
    }
}

/// Read a blob of a layout, checking its digest.
fn read_checked(path: &Path, digest: &str, max: u64) -> Result<Vec<u8>> {
    let f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut b = Vec::new();
    f.take(max + 1).read_to_end(&mut b)?;
    ensure!(
        b.len() as u64 <= max,
        "{} is larger than {max} bytes",
        path.display()
    );
    let d = artifacts::sha256_digest(&b);
    ensure!(
        d == digest,
        "{} has digest {d}, not {digest}",
        path.display()
    );
    Ok(b)
}

/// Pick the image manifest of a layout: `index.json`'s entries, nested indexes resolved to
/// the platform; exactly one candidate, or the one of the platform.
fn open_layout(dir: &Path, plat: &(String, String)) -> Result<LocalImage> {
    let index: serde_json::Value = serde_json::from_slice(
        &fs::read(dir.join("index.json"))
            .with_context(|| format!("{} is not an OCI image layout", dir.display()))?,
    )
    .context("index.json")?;
    let mut candidates: Vec<serde_json::Value> = Vec::new();
    let mut todo: Vec<serde_json::Value> =
        index["manifests"].as_array().cloned().unwrap_or_default();
    let mut depth = 0;
    while !todo.is_empty() {
        depth += 1;
        ensure!(depth < 4, "image indexes nested too deeply");
        let mut next = Vec::new();
        for d in todo {
            let mt = d["mediaType"].as_str().unwrap_or("");
            if mt == MEDIA_TYPE_OCI_INDEX || mt == MEDIA_TYPE_DOCKER_LIST {
                let digest = d["digest"].as_str().unwrap_or("");
                let p = dir.join("blobs/sha256").join(digest.get(7..).unwrap_or(""));
                check_digest(digest)?;
                let b = read_checked(&p, digest, artifacts::MAX_MANIFEST_BYTES as u64)?;
                let v: serde_json::Value = serde_json::from_slice(&b)?;
                next.extend(v["manifests"].as_array().cloned().unwrap_or_default());
            } else {
                candidates.push(d);
            }
        }
        todo = next;
    }
    let pick = if candidates.len() == 1 {
        candidates.remove(0)
    } else {
        candidates
            .into_iter()
            .find(|d| d["platform"]["os"] == plat.0 && d["platform"]["architecture"] == plat.1)
            .with_context(|| {
                format!(
                    "{}: no single image manifest, and none for {}/{}",
                    dir.display(),
                    plat.0,
                    plat.1
                )
            })?
    };
    let digest = pick["digest"].as_str().unwrap_or("").to_string();
    check_digest(&digest)?;
    let bytes = read_checked(
        &dir.join("blobs/sha256").join(&digest[7..]),
        &digest,
        artifacts::MAX_MANIFEST_BYTES as u64,
    )?;
    let manifest = Manifest::parse(&bytes)?;
    let media_type = manifest
        .media_type
        .clone()
        .or_else(|| pick["mediaType"].as_str().map(str::to_string))
        .unwrap_or_else(|| artifacts::MEDIA_TYPE_OCI_MANIFEST.into());
    Ok(LocalImage {
        dir: dir.to_path_buf(),
        subject: Descriptor {
            media_type,
            digest,
            size: bytes.len() as u64,
            artifact_type: None,
            annotations: BTreeMap::new(),
        },
        manifest,
    })
}

/// Unpack an OCI archive's `oci-layout`, `index.json` and `blobs/sha256/*` into `to`.
fn extract_archive(archive: &Path, to: &Path) -> Result<()> {
    let f = File::open(archive).with_context(|| format!("opening {}", archive.display()))?;
    let mut r = erofs_image::tar::TarReader::new(std::io::BufReader::new(f));
    fs::create_dir_all(to.join("blobs/sha256"))?;
    let mut buf = vec![0u8; 1 << 20];
    while let Some(e) = r.next_entry()? {
        if e.kind != erofs_image::tar::EntryKind::Regular {
            continue;
        }
        let path = String::from_utf8_lossy(&e.path).to_string();
        let path = path.trim_start_matches("./");
        let keep = path == "index.json"
            || path == "oci-layout"
            || path.strip_prefix("blobs/sha256/").is_some_and(|h| {
                h.len() == 64 && h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
            });
        if !keep {
            continue;
        }
        let mut out = File::create(to.join(path))?;
        loop {
            let n = r.read_data(&mut buf)?;
            if n == 0 {
                break;
            }
            out.write_all(&buf[..n])?;
        }
    }
    Ok(())
}

/// Pull an image's manifest, config and layers into `to` (an image layout's blob store).
fn pull(reference: &Reference, r: &RegistryArgs, to: &Path) -> Result<LocalImage> {
    let c = client(&reference.host, r)?;
    let plat = platform(r)?;
    let (fetched, manifest) = c.resolve_image(
        &reference.repository,
        reference.manifest_ref(),
        &plat.0,
        &plat.1,
    )?;
    let blobs = to.join("blobs/sha256");
    fs::create_dir_all(&blobs)?;
    for d in std::iter::once(&manifest.config).chain(&manifest.layers) {
        check_digest(&d.digest)?;
        let p = blobs.join(&d.digest[7..]);
        let mut f = File::create(&p)?;
        c.get_blob_to(
            &reference.repository,
            &d.digest,
            Some(d.size),
            u64::MAX,
            &mut f,
        )
        .with_context(|| format!("pulling {}", d.digest))?;
        f.sync_all()?;
    }
    Ok(LocalImage {
        dir: to.to_path_buf(),
        subject: fetched.descriptor(),
        manifest,
    })
}

fn now_rfc3339() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = (secs / 86400, secs % 86400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// Copy `len` bytes of `src` from `offset` into a blob of OUTDIR (hashing them on the way:
/// trees of large layers are not held in memory).
fn write_blob_from(outdir: &Path, media_type: &str, src: &Path, offset: u64) -> Result<Descriptor> {
    use sha2::Digest;
    let f = File::open(src)?;
    let len = f.metadata()?.len() - offset;
    let tmp = outdir.join("blobs/sha256/.incoming");
    let mut out = File::create(&tmp)?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut done = 0u64;
    while done < len {
        let k = ((len - done) as usize).min(buf.len());
        f.read_exact_at(&mut buf[..k], offset + done)?;
        h.update(&buf[..k]);
        out.write_all(&buf[..k])?;
        done += k as u64;
    }
    out.sync_all()?;
    let digest = format!("sha256:{}", hex::encode(h.finalize()));
    fs::rename(&tmp, outdir.join("blobs/sha256").join(&digest[7..]))?;
    Ok(Descriptor {
        media_type: media_type.into(),
        digest,
        size: len,
        artifact_type: None,
        annotations: BTreeMap::new(),
    })
}

fn write_blob(outdir: &Path, media_type: &str, data: &[u8]) -> Result<Descriptor> {
    let d = Descriptor::of(media_type, data);
    let p = outdir.join("blobs/sha256").join(&d.digest[7..]);
    fs::write(&p, data).with_context(|| format!("writing {}", p.display()))?;
    Ok(d)
}

/// What every layer of a build shares.
#[derive(Clone, Copy)]
struct BuildContext<'a> {
    mkfs: &'a MkfsOptions,
    mkfs_options: &'a [String],
    key: Option<&'a SecretKey>,
    outdir: &'a Path,
    work: &'a Path,
    full_image: bool,
}

/// Build one layer the way the differ does with `enable_tar_index` and dm-verity on, in
/// `work`; returns its artifacts and the layer file's path.
fn build_layer(
    cx: &BuildContext<'_>,
    img: &LocalImage,
    layer: &Descriptor,
    diff_id: &str,
) -> Result<(LayerArtifacts, PathBuf)> {
    let BuildContext {
        mkfs,
        mkfs_options,
        key,
        outdir,
        work,
        full_image,
    } = *cx;
    let blob = File::open(img.blob(&layer.digest)?)
        .with_context(|| format!("layer {} is not in the image", layer.digest))?;
    let path = work.join(format!("{}.erofs", &layer.digest[7..]));
    let out = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)?;
    // The options the differ uses for this layer (its UUID derives from the layer digest).
    let opts = mkfs.build_options(&layer.digest);
    let dec = Decompressed::new(blob, BombGuard::default())
        .with_context(|| format!("reading layer {}", layer.digest))?;
    let mut pipe = Pipeline::start(Box::new(dec));
    erofs_image::tar_to_index_file(&mut pipe, erofs_output::FileOutput::new(&out), &opts)
        .with_context(|| format!("indexing layer {}", layer.digest))?;
    let sum = pipe.finish().context("reading the layer")?;
    ensure!(
        sum.digest == diff_id,
        "layer {} uncompresses to {}, but the image config says its diffID is {diff_id}",
        layer.digest,
        sum.digest
    );
    out.sync_all()?;
    let len = out.metadata()?.len();
    let index_len = len - sum.size;
    let mut index = vec![0u8; index_len as usize];
    out.read_exact_at(&mut index, 0)?;
    drop(out);
    let meta = dmverity::append_tree(&path, true, None)?;
    let index_d = write_blob(outdir, MEDIA_TYPE_TAR_INDEX, &index)?;
    let tree_d = write_blob_from(outdir, MEDIA_TYPE_DMVERITY_TREE, &path, meta.hashoffset)?;
    let sign = |root: &str| -> Result<Option<SignatureBlob>> {
        let Some(k) = key else { return Ok(None) };
        Ok(Some(SignatureBlob {
            descriptor: write_blob(
                outdir,
                &format!(
                    "{}+{SCHEME_ED25519}",
                    artifacts::MEDIA_TYPE_SIGNATURE_PREFIX
                ),
                &k.sign_root(root),
            )?,
            scheme: SCHEME_ED25519.into(),
            public_key: Some(k.public().to_hex()),
        }))
    };
    let signature = sign(&meta.roothash)?;
    let (image_dmverity, image_signature) = if full_image {
        // A second pass over the blob: the full image as the differ writes it without tar
        // index (same options), then its tree.
        let ipath = work.join(format!("{}.image", &layer.digest[7..]));
        let out = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&ipath)?;
        let dec = Decompressed::new(File::open(img.blob(&layer.digest)?)?, BombGuard::default())
            .with_context(|| format!("reading layer {}", layer.digest))?;
        erofs_image::tar_to_image(dec, erofs_output::FileOutput::new(&out), &opts)
            .with_context(|| format!("building the image of layer {}", layer.digest))?;
        out.sync_all()?;
        drop(out);
        let m = dmverity::append_tree(&ipath, false, None)?;
        let descriptor = write_blob_from(
            outdir,
            artifacts::MEDIA_TYPE_IMAGE_DMVERITY_TREE,
            &ipath,
            m.hashoffset,
        )?;
        fs::remove_file(&ipath)?;
        let t = TreeBlob {
            descriptor,
            root_digest: m.roothash.clone(),
            block_size: dmverity::block_size(false) as u32,
            hash_offset: m.hashoffset,
        };
        (Some(t), sign(&m.roothash)?)
    } else {
        (None, None)
    };
    Ok((
        LayerArtifacts {
            layer_digest: layer.digest.clone(),
            diff_id: diff_id.to_string(),
            tar_index: TarIndexBlob {
                descriptor: index_d,
                tar_size: sum.size,
                mkfs_options: (!mkfs_options.is_empty()).then(|| mkfs_options.join(" ")),
            },
            dmverity: Some(TreeBlob {
                descriptor: tree_d,
                root_digest: meta.roothash,
                block_size: dmverity::block_size(true) as u32,
                hash_offset: meta.hashoffset,
            }),
            signature,
            image_dmverity,
            image_signature,
        },
        path,
    ))
}

fn build(a: ArtifactsBuildArgs) -> Result<ExitCode> {
    let mkfs = MkfsOptions::parse(&a.mkfs_options).context("--mkfs-option")?;
    let key = match &a.sign_key {
        Some(p) => Some(SecretKey::from_text(
            &fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?,
        )?),
        None => None,
    };
    fs::create_dir_all(a.outdir.join("blobs/sha256"))?;
    let work = a.outdir.join(".work");
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work)?;
    let r = (|| {
        let src = Path::new(&a.source);
        let plat = platform(&a.registry)?;
        let img = if src.is_dir() {
            open_layout(src, &plat)?
        } else if src.is_file() {
            let layout = work.join("layout");
            extract_archive(src, &layout)?;
            open_layout(&layout, &plat)?
        } else {
            let reference = Reference::parse(&a.source).with_context(|| {
                format!(
                    "{:?} is neither a directory, a file nor an image reference",
                    a.source
                )
            })?;
            pull(&reference, &a.registry, &work.join("layout"))?
        };
        let config: serde_json::Value = serde_json::from_slice(&read_checked(
            &img.blob(&img.manifest.config.digest)?,
            &img.manifest.config.digest,
            MAX_CONFIG,
        )?)
        .context("image config")?;
        let diff_ids: Vec<String> = config["rootfs"]["diff_ids"]
            .as_array()
            .map(|v| {
                v.iter()
                    .filter_map(|d| d.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        ensure!(
            diff_ids.len() == img.manifest.layers.len(),
            "the image has {} layers but its config {} diffIDs",
            img.manifest.layers.len(),
            diff_ids.len()
        );
        let mut layers = Vec::new();
        for (i, (l, diff_id)) in img.manifest.layers.iter().zip(&diff_ids).enumerate() {
            match layer_type(&l.media_type) {
                Ok(LayerType::Tar(_)) => {}
                Ok(LayerType::Erofs(_)) => {
                    eprintln!(
                        "layer {}: {} is an EROFS layer: nodes use it as it is, no artifacts",
                        i + 1,
                        l.digest
                    );
                    continue;
                }
                Err(e) => bail!("layer {} ({}): {e}", i + 1, l.digest),
            }
            let start = std::time::Instant::now();
            let cx = BuildContext {
                mkfs: &mkfs,
                mkfs_options: &a.mkfs_options,
                key: key.as_ref(),
                outdir: &a.outdir,
                work: &work,
                full_image: a.full_image,
            };
            let (art, path) = build_layer(&cx, &img, l, diff_id)?;
            if a.keep_layers {
                let dir = a.outdir.join("layers");
                fs::create_dir_all(&dir)?;
                fs::rename(&path, dir.join(&diff_id[7..]))?;
            } else {
                fs::remove_file(&path)?;
            }
            let t = art.dmverity.as_ref().expect("built with a tree");
            println!(
                "layer {} {}: index {} B, tar {} B, tree {} B, root {}{}{} ({:.1} s)",
                i + 1,
                l.digest,
                art.tar_index.descriptor.size,
                art.tar_index.tar_size,
                t.descriptor.size,
                t.root_digest,
                if art.signature.is_some() {
                    ", signed"
                } else {
                    ""
                },
                match &art.image_dmverity {
                    Some(t) => format!(
                        "; full image {} B, tree {} B, root {}",
                        t.hash_offset, t.descriptor.size, t.root_digest
                    ),
                    None => String::new(),
                },
                start.elapsed().as_secs_f64()
            );
            layers.push(art);
        }
        let set = ArtifactSet {
            subject: img.subject.clone(),
            created: Some(now_rfc3339()),
            layers,
        };
        let m = set.to_manifest();
        fs::write(
            a.outdir
                .join("blobs/sha256")
                .join(&artifacts::EMPTY_DIGEST[7..]),
            EMPTY_BLOB,
        )?;
        let bytes = m.to_bytes();
        fs::write(a.outdir.join("manifest.json"), &bytes)?;
        println!(
            "artifacts {} for image manifest {} in {}",
            artifacts::sha256_digest(&bytes),
            img.subject.digest,
            a.outdir.display()
        );
        Ok(ExitCode::SUCCESS)
    })();
    let _ = fs::remove_dir_all(&work);
    r
}

fn push(a: ArtifactsPushArgs) -> Result<ExitCode> {
    let bytes = fs::read(a.outdir.join("manifest.json")).with_context(|| {
        format!(
            "{} has no manifest.json: run artifacts build",
            a.outdir.display()
        )
    })?;
    let set = ArtifactSet::parse(&bytes)?;
    let target = Reference::parse(&a.target)?;
    let c = client(&target.host, &a.registry)?;
    let repo = &target.repository;
    if target.tag.is_some() || target.digest.is_some() {
        let d = c
            .head_manifest(repo, target.manifest_ref())?
            .with_context(|| format!("{target} is not in the registry"))?;
        ensure!(
            d.digest == set.subject.digest,
            "{target} is manifest {}, but the artifacts were built for {}",
            d.digest,
            set.subject.digest
        );
    } else if c.head_manifest(repo, &set.subject.digest)?.is_none() {
        bail!(
            "the image manifest {} is not in {}/{repo}: push the image first",
            set.subject.digest,
            target.host
        );
    }
    let mut n = 0;
    for l in &set.layers {
        let blobs = std::iter::once(&l.tar_index.descriptor)
            .chain(l.dmverity.as_ref().map(|t| &t.descriptor))
            .chain(l.signature.as_ref().map(|s| &s.descriptor))
            .chain(l.image_dmverity.as_ref().map(|t| &t.descriptor))
            .chain(l.image_signature.as_ref().map(|s| &s.descriptor));
        for d in blobs {
            check_digest(&d.digest)?;
            let p = a.outdir.join("blobs/sha256").join(&d.digest[7..]);
            let f = File::open(&p).with_context(|| format!("opening {}", p.display()))?;
            ensure!(
                f.metadata()?.len() == d.size,
                "{} is not {} bytes long",
                p.display(),
                d.size
            );
            c.put_blob_file(repo, &d.digest, &f, d.size)
                .with_context(|| format!("pushing {}", d.digest))?;
            n += 1;
        }
    }
    let m = Manifest::parse(&bytes)?;
    let pushed = c.push_referrer(repo, &m, !a.keep_old)?;
    println!(
        "pushed {n} blobs and artifacts {} for {} to {}/{repo} ({})",
        pushed.digest,
        set.subject.digest,
        target.host,
        match pushed.via {
            ReferrersVia::Api => "Referrers API".to_string(),
            ReferrersVia::Tag => format!(
                "referrers tag {}",
                artifacts::referrers_tag(&set.subject.digest)?
            ),
        }
    );
    Ok(ExitCode::SUCCESS)
}

fn ls(a: ArtifactsLsArgs) -> Result<ExitCode> {
    let reference = Reference::parse(&a.image)?;
    let c = client(&reference.host, &a.registry)?;
    let plat = platform(&a.registry)?;
    let repo = &reference.repository;
    let (image, manifest) = c.resolve_image(repo, reference.manifest_ref(), &plat.0, &plat.1)?;
    let key = match &a.public_key {
        Some(p) => Some(PublicKey::from_text(
            &fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?,
        )?),
        None => None,
    };
    let (referrers, via) = c.referrers(repo, &image.digest, Some(ARTIFACT_TYPE))?;
    println!(
        "image {reference} manifest {} ({} layers); {} referrer(s) of type {ARTIFACT_TYPE} ({})",
        image.digest,
        manifest.layers.len(),
        referrers.manifests.len(),
        match via {
            ReferrersVia::Api => "Referrers API",
            ReferrersVia::Tag => "referrers tag",
        }
    );
    let mut bad = false;
    for r in &referrers.manifests {
        let m = c.get_manifest(repo, &r.digest)?;
        let set = match ArtifactSet::parse(&m.bytes) {
            Ok(s) if s.subject.digest == image.digest => s,
            Ok(s) => {
                println!(
                    "artifacts {}: INVALID: subject {} is not this image",
                    r.digest, s.subject.digest
                );
                bad = true;
                continue;
            }
            Err(e) => {
                println!("artifacts {}: INVALID: {e}", r.digest);
                bad = true;
                continue;
            }
        };
        println!(
            "artifacts {} created {}",
            r.digest,
            set.created.as_deref().unwrap_or("?")
        );
        for (i, l) in manifest.layers.iter().enumerate() {
            let Some(art) = set.layer(&l.digest) else {
                println!("  layer {} {}: no artifacts", i + 1, l.digest);
                continue;
            };
            println!("  layer {} {} diffID {}", i + 1, l.digest, art.diff_id);
            println!(
                "    tar-index      {:>10} B  (tar {} B)",
                art.tar_index.descriptor.size, art.tar_index.tar_size
            );
            match &art.dmverity {
                Some(t) => println!(
                    "    dmverity-tree  {:>10} B  root {} block {} offset {}",
                    t.descriptor.size, t.root_digest, t.block_size, t.hash_offset
                ),
                None => println!("    dmverity-tree  none"),
            }
            let mut show_sig =
                |name: &str, sig: &Option<SignatureBlob>, tree: &Option<TreeBlob>| -> Result<()> {
                    let (Some(s), Some(t)) = (sig, tree) else {
                        println!("    {name:<14} none");
                        return Ok(());
                    };
                    let verdict = match &key {
                        None => "not checked (no --public-key)".to_string(),
                        Some(_) if s.scheme != SCHEME_ED25519 => {
                            bad = true;
                            format!("INVALID: unknown scheme {}", s.scheme)
                        }
                        Some(k) => {
                            let sig = c.get_blob(repo, &s.descriptor, MAX_SIGNATURE)?;
                            match k.verify_root(&t.root_digest, &sig) {
                                Ok(()) => "valid".to_string(),
                                Err(e) => {
                                    bad = true;
                                    format!("INVALID: {e}")
                                }
                            }
                        }
                    };
                    println!(
                        "    {name:<14} {:>10} B  {} key {}: {verdict}",
                        s.descriptor.size,
                        s.scheme,
                        s.public_key.as_deref().unwrap_or("?")
                    );
                    Ok(())
                };
            show_sig("signature", &art.signature, &art.dmverity)?;
            if let Some(t) = &art.image_dmverity {
                println!(
                    "    image-tree     {:>10} B  root {} block {} offset {}",
                    t.descriptor.size, t.root_digest, t.block_size, t.hash_offset
                );
                show_sig("image-sig", &art.image_signature, &art.image_dmverity)?;
            }
        }
    }
    Ok(if bad {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

fn keygen(a: KeygenArgs) -> Result<ExitCode> {
    let k = SecretKey::generate()?;
    let mut pub_path = a.key.clone().into_os_string();
    pub_path.push(".pub");
    let write = |p: &Path, text: &str, mode: u32| -> Result<()> {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(p)
            .with_context(|| format!("creating {}", p.display()))?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        Ok(())
    };
    write(&a.key, &k.to_text(), 0o600)?;
    write(Path::new(&pub_path), &k.public().to_text(), 0o644)?;
    println!(
        "wrote {} and {} (public key {})",
        a.key.display(),
        Path::new(&pub_path).display(),
        k.public().to_hex()
    );
    Ok(ExitCode::SUCCESS)
}

pub fn verify(a: VerifyArgs) -> Result<ExitCode> {
    let mkfs = MkfsOptions::parse(&a.mkfs_options).context("--mkfs-option")?;
    let f = File::open(&a.image).with_context(|| format!("opening {}", a.image.display()))?;
    let r = erofs_image::verify::verify_diff_id(&f, &a.diff_id, a.tar_size).and_then(|loc| {
        if let Some(d) = &a.layer_digest {
            erofs_image::verify::verify_index(&f, loc, &mkfs.build_options(d))?;
        }
        Ok(loc)
    });
    match r {
        Ok(loc) => {
            println!(
                "{}: the tar ({} bytes at offset {}) has diffID {}{}",
                a.image.display(),
                loc.len,
                loc.offset,
                a.diff_id,
                if a.layer_digest.is_some() {
                    ", and the index is the one it gives"
                } else {
                    " (index not checked: no --layer-digest)"
                }
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("erofs-snapshotter: {}: {e}", a.image.display());
            Ok(ExitCode::FAILURE)
        }
    }
}
