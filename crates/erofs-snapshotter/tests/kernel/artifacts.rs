//! Registry layer artifacts where the kernel checks the data (issue 15): with
//! `dmverity_mode = "on"` and a root hash signed by a trusted key, a fetched dm-verity tree is
//! checked against its root only (`tree_check="root-only"`), and every read of the layer goes
//! through dm-verity. The saving is sound only if the kernel then refuses data the tree does
//! not describe, which is what this shows:
//!
//! - signed artifacts built as the producer builds them are used for every layer of a chain,
//!   each `layer.erofs` is byte for byte the locally built one, and a View reads the files
//!   through one dm-verity device per layer;
//! - a signed, self-consistent tree of *other* data (one byte of the tar flipped before the
//!   tree was made) passes the root-only check, as it must, and then the block it disagrees
//!   on fails with EIO through dm-verity while the rest of the layer reads back.
//!
//! Before Linux 6.4 there are no tar-index layers (no 512-byte blocks): there the test checks
//! that the daemon refuses the configuration at start-up, naming the reason.
//!
//! The daemon reaches a local `docker-registry` (plain HTTP on 127.0.0.1, the referrers tag);
//! the image is identified by Apply's descriptor annotations, as containerd 1.7 and 2.1 with
//! snapshot annotations pass it.

use std::fs;
use std::path::Path;

use anyhow::{Context, Result, bail, ensure};
use containerd_api::containerd::types::Descriptor;
use erofs_registry::signature::SecretKey;
use testsuite::Registry;
use testsuite::oci::{self, Compression, ImageSpec, LayerBuilder, OciArchive};

use crate::common::{BIN, Cfg, Env, run};
use crate::dmverity::{apply_on, check_devices, wait_no_devices};
use crate::producer::{Built, Push, build_layer, push_artifacts};
use crate::sys::drop_caches;

const EIO: i32 = 5;

/// An image of `n` layers, each with a small file and a 200 kB one (`d{i}/data.bin`) whose
/// middle is the middle of the layer's tar.
fn spec(name: &str, n: usize) -> Result<ImageSpec> {
    let mut spec = ImageSpec::new(&format!("testsuite/{name}:1"));
    for i in 0..n {
        let (small, big) = contents(name, i);
        let mut l = LayerBuilder::new();
        l.dir(&format!("d{i}"), 0o755)
            .file(&format!("d{i}/small"), 0o644, &small)
            .file(&format!("d{i}/data.bin"), 0o644, &big);
        spec = spec.layer(l.finish()?, Compression::Gzip);
    }
    Ok(spec)
}

/// Layer `i`'s two files: `small` and `data.bin`.
fn contents(name: &str, i: usize) -> (Vec<u8>, Vec<u8>) {
    let big = (0..200_000u32)
        .map(|k| (k.wrapping_mul(2_654_435_761) >> (i + 3)) as u8)
        .collect();
    (format!("{name} {i}\n").into_bytes(), big)
}

/// The registry, the keys and the daemon's config that points at them.
struct World {
    reg: Registry,
    key: SecretKey,
    other: SecretKey,
    dir: tempfile::TempDir,
}

impl World {
    fn new() -> Result<World> {
        let dir = tempfile::tempdir()?;
        Ok(World {
            reg: Registry::start()?,
            key: SecretKey::generate()?,
            other: SecretKey::generate()?,
            dir,
        })
    }

    /// Tar index and dm-verity tree (`dmverity_mode = "on"`, so every mount goes through
    /// dm-verity), artifacts from the registry (loopback: plain HTTP) trusting `key`.
    fn cfg(&self) -> Result<Cfg> {
        let pubkey = self.dir.path().join("trusted.pub");
        fs::write(&pubkey, self.key.public().to_text())?;
        let hosts = self.dir.path().join("certs.d");
        fs::create_dir_all(&hosts)?;
        Ok(Cfg::new()
            .sn("dmverity_mode = \"on\"")
            .df("enable_tar_index = true")
            .df("enable_dmverity = true")
            .section("artifacts", "enabled = true")
            .section("artifacts", &format!("hosts_dir = {:?}", hosts))
            .section("artifacts", "fetch_timeout = \"20s\"")
            .section("artifacts", &format!("trusted_keys = [{:?}]", pubkey)))
    }

    /// Build `spec`, push it, build its layers' artifacts and push them (`how`): the
    /// archive and what was built.
    fn image(&self, spec: &ImageSpec, how: Push) -> Result<(OciArchive, String, Vec<Built>)> {
        let out = self.dir.path().join(spec.name().replace([':', '/'], "_"));
        fs::create_dir_all(&out)?;
        let archive = oci::build_archive(spec, &out)?;
        let repo = archive.repo.clone();
        let reference = self.reg.push_as(&archive, &repo, "1")?;
        let built = archive
            .layers
            .iter()
            .map(|l| build_layer(&archive, l, &out))
            .collect::<Result<Vec<_>>>()?;
        push_artifacts(
            &self.reg,
            &repo,
            &archive,
            &built,
            how,
            &self.key,
            &self.other,
        )?;
        Ok((archive, reference, built))
    }
}

/// The layer blobs of `archive` in the daemon's content directory, each descriptor
/// annotated with the image (reference and manifest digest) as containerd passes it.
fn descriptors(env: &Env, archive: &OciArchive, reference: &str) -> Result<Vec<Descriptor>> {
    archive
        .layers
        .iter()
        .map(|l| {
            let blob = fs::read(archive.blob_path(&l.blob.digest))?;
            let mut d = env.add_blob(oci::media_type(l.compression), &blob)?;
            ensure!(d.digest == l.blob.digest);
            d.annotations.insert(
                snapshotter::artifacts::LABEL_IMAGE_REF.into(),
                reference.into(),
            );
            d.annotations.insert(
                snapshotter::artifacts::LABEL_MANIFEST_DIGEST.into(),
                archive.manifest.digest.clone(),
            );
            Ok(d)
        })
        .collect()
}

/// Apply `descs` as a chain `{p}/l0..`; the snapshot ids.
async fn apply_chain(env: &Env, p: &str, descs: &[Descriptor]) -> Result<Vec<u64>> {
    let mut ids = Vec::new();
    let mut parent = String::new();
    for (i, d) in descs.iter().enumerate() {
        let name = format!("{p}/l{i}");
        ids.push(apply_on(env, &format!("{p}/a{i}"), &parent, &name, d).await?);
        parent = name;
    }
    Ok(ids)
}

/// Every layer of `built` used its fetched artifacts with the root-only tree check (one log
/// line each), and its `layer.erofs` (snapshot `ids`, same order) is the built file.
fn assert_used_root_only(env: &Env, built: &[Built], ids: &[u64]) -> Result<()> {
    let log = env.log_text();
    for (b, &id) in built.iter().zip(ids) {
        let lines: Vec<&str> = log
            .lines()
            .filter(|l| l.contains(&b.layer_digest) && l.contains("artifacts"))
            .collect();
        ensure!(
            lines.len() == 1
                && lines[0].contains("used layer artifacts from the registry")
                && lines[0].contains("tree_check=\"root-only\""),
            "layer {}: {lines:#?}",
            b.layer_digest
        );
        let file = oci::sha256_file(&env.layer(id))?;
        ensure!(
            file == b.file_sha,
            "layer {}: layer.erofs is not the built [index][tar][tree]",
            b.layer_digest
        );
    }
    Ok(())
}

fn read_all(root: &Path, n: usize) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
    (0..n)
        .map(|i| {
            Ok((
                fs::read(root.join(format!("d{i}/small")))?,
                fs::read(root.join(format!("d{i}/data.bin")))?,
            ))
        })
        .collect()
}

/// On kernels before 6.4 (Debian 12's 6.1), which cannot mount 512-byte blocks and so no
/// tar-index layer, the daemon must refuse this configuration at start-up and say why (not
/// fail the first mount with EINVAL); from 6.4 on, the artifacts are used as above.
#[test]
fn signed_trees_checked_at_their_root_only_and_the_kernel_checks_the_data() {
    let w = World::new().expect("starting the registry");
    let cfg = w.cfg().expect("config");
    if crate::sys::kernel_version() < (6, 4) {
        let mut env = Env::new(BIN, cfg).expect("creating the test environment");
        let (status, log) = env.start_expecting_refusal().expect("starting the daemon");
        assert!(
            !status.success()
                && log.contains("differ.enable_tar_index")
                && log.contains("512-byte blocks"),
            "{status}: {log}"
        );
        return;
    }
    run(Env::new(BIN, cfg), async |env| {
        // Good, signed artifacts: used, root-only, byte-identical, readable through
        // dm-verity.
        let spec = spec("art-root-only", 2)?;
        let (archive, reference, built) = w.image(&spec, Push::Good)?;
        let descs = descriptors(env, &archive, &reference)?;
        let ids = apply_chain(env, "ro", &descs).await?;
        assert_used_root_only(env, &built, &ids)?;
        let v = env.c().view("ro/v", "ro/l1").await?;
        let m = env.mount(&v, "v")?;
        let want: Vec<_> = (0..2).map(|i| contents("art-root-only", i)).collect();
        ensure!(read_all(m.path(), 2)? == want, "the files read back wrong");
        check_devices(env, &ids)?;
        m.unmount()?;

        // A signed tree of other data: the root-only check cannot tell (nothing but the data
        // can), so it is used, and the kernel refuses the one block it disagrees on.
        let spec = self::spec("art-other-data", 1)?;
        let (archive, reference, built) = w.image(&spec, Push::OtherData)?;
        let descs = descriptors(env, &archive, &reference)?;
        let ids2 = apply_chain(env, "od", &descs).await?;
        let respun: Vec<Built> = built
            .iter()
            .map(|b| b.with_tree_of_other_data(b.index.len() as u64 + b.tar_size / 2))
            .collect::<Result<_>>()?;
        assert_used_root_only(env, &respun, &ids2)?;
        let v = env.c().view("od/v", "od/l0").await?;
        let m = env.mount(&v, "v")?;
        drop_caches()?;
        ensure!(
            fs::read(m.path().join("d0/small"))? == b"art-other-data 0\n",
            "a block the tree describes must read back"
        );
        match fs::read(m.path().join("d0/data.bin")) {
            Err(e) if e.raw_os_error() == Some(EIO) => {}
            other => bail!(
                "a block the signed tree does not describe read as {:?}, not EIO",
                other.map(|v| v.len())
            ),
        }
        m.unmount()?;

        for k in ["ro/v", "ro/l1", "ro/l0", "od/v", "od/l0"] {
            env.c()
                .remove(k)
                .await
                .with_context(|| format!("removing {k}"))?;
        }
        wait_no_devices(env, "after Remove")?;
        Ok(())
    });
}
