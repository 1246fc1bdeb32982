//! The differ end to end (issue 4), with containerd 2.1 and our daemon serving both the
//! proxy snapshotter `erofs-rs` and the proxy differ `erofs-rs-diff` on one socket.
//! Needs root, erofs and overlayfs, containerd 2.1 under /opt/containerd-new and Debian's
//! docker-registry (scripts/setup installs them).
//!
//! - [`import_and_pull`]: `ctr images import` and `ctr images pull --plain-http` unpack
//!   gzip, zstd and plain OCI layers and Docker schema 2 layers through our differ, then
//!   `ctr run` works; [`media_types`] covers the other media types through the Diff API.
//! - [`tar_index`]: `enable_tar_index`: `layer.erofs` is `[index][tar]`.
//! - [`content_over_grpc`]: blobs read over containerd's Content service, digest-checked.
//! - [`native_erofs`]: `application/vnd.erofs.layer.v1` (and `+zstd`) layers (containerd
//!   2.1.9 does not know these media types: through the API, then `ctr run --rootfs`).
//! - [`parallel_unpack`]: containerd 2.1.9 has no parallel unpack, so the same calls through
//!   the API: parentless Prepares and concurrent Applies, then rebasing Commits in order.
//! - [`diff_id_mismatch`]: a wrong diffID fails the unpack and leaves nothing behind.
//! - [`compare`]: a container's changes as a layer (`ctr snapshots diff`, and the Diff API
//!   with zstd and plain tar) reproduce its tree when applied on the parent; committed
//!   layers diffed against their parents give their content back. Regressions of bugs these
//!   tests found: [`compare_base_layer`] (a diff against no parent), [`compare_twice`] (a
//!   diff whose blob already exists), [`compare_content_survives_gc`] (a diff stored without
//!   a lease).
//! - [`bad_input`]: corrupt and hostile layers fail cleanly; the daemon keeps serving.
//!
//! The world each test runs in is `testsuite::wired_containerd`; the benchmark behind
//! `bench/differ` is the `bench-differ` binary of crates/bench.

#[path = "differ_e2e/images.rs"]
mod images;
#[path = "differ_e2e/trees.rs"]
mod trees;

use std::fs;
use std::io::Read;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use images::{DOCKER_GZIP, DOCKER_TAR, EROFS, EROFS_ZSTD, Layer};
use testsuite::client::Labels;
use testsuite::oci::{self, Compression, ImportOpts, LayerBuilder};
use testsuite::wired_containerd::{SN, Setup, World, active_dir, descriptor};
use testsuite::{Registry, RunOpts, unique_name};
use tonic::Code;

/// The daemon binary under test.
const BIN: &str = env!("CARGO_BIN_EXE_erofs-snapshotter");

const TAR: &str = "application/vnd.oci.image.layer.v1.tar";

fn busybox() -> Result<Vec<u8>> {
    oci::busybox_base_layer()
}

/// A layer tar built with the harness's builder.
fn layer(f: impl FnOnce(&mut LayerBuilder)) -> Result<Vec<u8>> {
    let mut l = LayerBuilder::new();
    f(&mut l);
    l.finish()
}

/// Run `f` in a new world; on failure, print the tails of the daemon's and containerd's logs.
fn e2e(setup: Setup, f: impl FnOnce(&mut World) -> Result<()>) -> Result<()> {
    let mut w = World::start(Path::new(BIN), setup)?;
    let r = f(&mut w);
    if let Err(e) = &r {
        eprintln!(
            "{e:#}\n--- daemon log tail ---\n{}\n--- containerd log tail ---\n{}",
            w.daemon
                .as_ref()
                .map(|d| d.log_tail(40))
                .unwrap_or_default(),
            w.ctd.log_tail(40)
        );
    }
    r
}

/// The entries of a tar: path → (kind, regular file content or link target). Hard links
/// become regular entries with their target's content (which of two links a tar writer
/// stores as the file is its choice).
fn tar_entries(
    tar: &[u8],
) -> Result<std::collections::BTreeMap<String, (erofs_image::tar::EntryKind, Vec<u8>)>> {
    use erofs_image::tar::{EntryKind, TarReader};
    let mut out = std::collections::BTreeMap::new();
    let mut r = TarReader::new(tar);
    while let Some(e) = r.next_entry()? {
        let mut data = vec![0u8; e.size as usize];
        let mut got = 0;
        while got < data.len() {
            let k = r.read_data(&mut data[got..])?;
            ensure!(k > 0, "short data for {}", e.display_path());
            got += k;
        }
        let v = match e.kind {
            EntryKind::Regular => (EntryKind::Regular, data),
            EntryKind::Hardlink => {
                let target = String::from_utf8_lossy(&e.link).into_owned();
                let (_, d) = out
                    .get(&target)
                    .cloned()
                    .with_context(|| format!("hard link to a later entry {target}"))?;
                (EntryKind::Regular, d)
            }
            k => (k, e.link.clone()),
        };
        out.insert(e.display_path().trim_end_matches('/').to_string(), v);
    }
    Ok(out)
}

/// `ctr snapshots diff` of each committed layer of an image from layer `from` on (against its
/// parent) gives back what the layer holds: every entry of the original layer tar, same
/// kind, same content.
fn committed_diffs_match(
    w: &World,
    img: &oci::OciArchive,
    tars: &[Vec<u8>],
    from: usize,
) -> Result<()> {
    use erofs_image::tar::EntryKind;
    let chains = oci::chain_ids(
        &img.layers
            .iter()
            .map(|l| l.diff_id.clone())
            .collect::<Vec<_>>(),
    );
    for (i, tar) in tars.iter().enumerate().skip(from) {
        let out = ctr_snapshots_diff(w, &[&chains[i]])?;
        ensure!(
            out.status.success(),
            "ctr snapshots diff of committed layer {i} ({}): {}",
            img.layers[i].blob.media_type,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        let got = tar_entries(&decompress("gzip", &out.stdout)?)?;
        for (p, (k, d)) in tar_entries(tar)? {
            match got.get(&p) {
                Some((gk, gd)) if *gk == k && (k == EntryKind::Directory || *gd == d) => {}
                other => bail!(
                    "layer {i}: {p} is {k:?} in the layer, {:?} in its diff",
                    other.map(|(k, d)| (k, d.len()))
                ),
            }
        }
    }
    Ok(())
}

/// `ctr snapshots --snapshotter erofs-rs diff ARGS`.
fn ctr_snapshots_diff(w: &World, args: &[&str]) -> Result<std::process::Output> {
    let mut all = vec!["diff"];
    all.extend_from_slice(args);
    w.ctd.snapshots(SN, &all)
}

/// `ctr run --rm` of `script` in `image`; its stdout.
fn run_sh(w: &World, image: &str, script: &str) -> Result<String> {
    let out = w.ctd.run(SN, image, &["/bin/sh", "-c", script])?;
    w.ctd.check(&out, &format!("ctr run {image} {script:?}"))
}

/// Decompress a blob by media type.
fn decompress(media_type: &str, blob: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    if media_type.ends_with("gzip") {
        flate2::read::GzDecoder::new(blob).read_to_end(&mut out)?;
    } else if media_type.ends_with("zstd") {
        out = zstd::decode_all(blob)?;
    } else {
        out = blob.to_vec();
    }
    Ok(out)
}

/// After a failed unpack: containerd removes the extraction snapshot (its garbage
/// collector calls our Remove), then our Cleanup removes the directory. Nothing active is
/// left, every directory belongs to a snapshot the daemon lists, and no temporary layer
/// remains.
fn assert_failed_unpack_left_nothing(w: &World) -> Result<()> {
    let ctr_active: Vec<_> = w
        .ctr_snapshots()?
        .into_iter()
        .filter(|(_, _, k)| k != "Committed")
        .collect();
    ensure!(
        ctr_active.is_empty(),
        "ctr snapshots ls still shows {ctr_active:?}"
    );
    let g = w.grpc()?;
    w.wait_until(
        Duration::from_secs(30),
        "containerd to remove the failed extraction snapshot from the daemon",
        || {
            let l = w.block_on(g.list(&[]))?;
            Ok(l.iter().all(|i| i.kind != 2))
        },
    )?;
    w.block_on(g.cleanup())?;
    let listed = w.block_on(g.list(&[]))?;
    let (ids, other) = w.snapshot_dirs()?;
    ensure!(
        other.is_empty(),
        "entries left in snapshots/ after Cleanup: {other:?}"
    );
    ensure!(
        ids.len() == listed.len(),
        "{} snapshot directories but {} snapshots after Cleanup: {ids:?} vs {:?}",
        ids.len(),
        listed.len(),
        listed.iter().map(|i| &i.name).collect::<Vec<_>>()
    );
    ensure!(w.temp_layers()?.is_empty(), "temporary layers left");
    Ok(())
}

/// 1. Import (OCI: gzip, zstd, plain) and pull from a local registry (OCI, and Docker schema
///    2 with `rootfs.diff.tar.gzip` and `rootfs.diff.tar`): every layer through our differ,
///    then containers run.
#[test]
fn import_and_pull() -> Result<()> {
    e2e(Setup::default(), |w| {
        let base = busybox()?;

        // Imported, OCI media types.
        let l2 = layer(|l| {
            l.dir("a", 0o755).file("a/zst", 0o644, b"zstd layer\n");
        })?;
        let l3 = layer(|l| {
            l.dir("a", 0o755)
                .file("a/tar", 0o644, b"plain layer\n")
                .whiteout("etc/group");
        })?;
        let spec = oci::ImageSpec::new(&unique_name("imp"))
            .layer(base.clone(), Compression::Gzip)
            .layer(l2, Compression::Zstd)
            .layer(l3, Compression::None);
        let imported = oci::build_archive(&spec, &w.work)?;
        oci::import(&w.ctd, &imported, SN)?;
        w.assert_unpacked_by_us(&imported)?;
        let out = run_sh(
            w,
            &imported.name,
            "cat /a/zst /a/tar; test -e /etc/group || echo group-gone",
        )?;
        ensure!(
            out == "zstd layer\nplain layer\ngroup-gone\n",
            "container saw {out:?}"
        );

        // Pulled, OCI media types (other content, so the layers are unpacked again).
        let reg = Registry::start()?;
        let p1 = layer(|l| {
            l.dir("b", 0o755).file("b/plain", 0o644, b"pulled plain\n");
        })?;
        let p2 = layer(|l| {
            l.dir("b", 0o755).file("b/zst", 0o644, b"pulled zstd\n");
        })?;
        let p3 = layer(|l| {
            l.dir("b", 0o755).file("b/gz", 0o644, b"pulled gzip\n");
        })?;
        let spec = oci::ImageSpec::new(&unique_name("pull"))
            .layer(p1, Compression::None)
            .layer(base.clone(), Compression::Gzip)
            .layer(p2, Compression::Zstd)
            .layer(p3, Compression::Gzip);
        let pulled = oci::build_archive(&spec, &w.work)?;
        let reference = reg.push_image(&pulled)?;
        w.ctd.pull_plain_http(&reference, SN)?;
        w.assert_unpacked_by_us(&pulled)?;
        let out = run_sh(w, &reference, "cat /b/plain /b/zst /b/gz")?;
        ensure!(out == "pulled plain\npulled zstd\npulled gzip\n", "{out:?}");

        // Pulled, Docker schema 2.
        let d1 = layer(|l| {
            l.dir("c", 0o755).file("c/first", 0o644, b"docker gzip\n");
        })?;
        let d3 = layer(|l| {
            l.dir("c", 0o755).file("c/plain", 0o644, b"docker plain\n");
        })?;
        let docker = images::archive(
            &w.work,
            &unique_name("docker"),
            &[
                Layer::with_type(&d1, Compression::Gzip, DOCKER_GZIP)?,
                Layer::with_type(&base, Compression::Gzip, DOCKER_GZIP)?,
                Layer::with_type(&d3, Compression::None, DOCKER_TAR)?,
            ],
            true,
        )?;
        let reference = reg.push_image(&docker)?;
        w.ctd.pull_plain_http(&reference, SN)?;
        w.assert_unpacked_by_us(&docker)?;
        let out = run_sh(w, &reference, "cat /c/first /c/plain")?;
        ensure!(out == "docker gzip\ndocker plain\n", "{out:?}");
        // The same Docker image imported.
        let docker_imp = images::archive(
            &w.work,
            &unique_name("dockerimp"),
            &[
                Layer::with_type(
                    &layer(|l| {
                        l.file("d-first", 0o644, b"1\n");
                    })?,
                    Compression::Gzip,
                    DOCKER_GZIP,
                )?,
                Layer::with_type(&base, Compression::None, DOCKER_TAR)?,
            ],
            true,
        )?;
        oci::import(&w.ctd, &docker_imp, SN)?;
        w.assert_unpacked_by_us(&docker_imp)?;
        ensure!(run_sh(w, &docker_imp.name, "cat /d-first")? == "1\n");

        // containerd never fell back to the walking differ: every committed snapshot of ours
        // has a layer our differ wrote, and the applied count covers every distinct layer.
        let applied = w.applied();
        for img in [&imported, &pulled, &docker, &docker_imp] {
            for l in &img.layers {
                ensure!(applied.iter().any(|a| a.layer == l.blob.digest));
            }
        }
        eprintln!("{} layers applied by our differ", applied.len());
        Ok(())
    })
}

/// Media types the images above do not use, classified by Apply through the Diff API:
/// Docker foreign and zstd layers, OCI non-distributable ones are tar layers; encrypted and
/// unknown types, and mounts that are not ours, are Unimplemented (containerd falls through).
#[test]
fn media_types() -> Result<()> {
    e2e(Setup::default(), |w| {
        let tars: &[(&str, Compression)] = &[
            (
                "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
                Compression::Gzip,
            ),
            (
                "application/vnd.docker.image.rootfs.diff.tar.zstd",
                Compression::Zstd,
            ),
            (
                "application/vnd.oci.image.layer.nondistributable.v1.tar",
                Compression::None,
            ),
            (
                "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
                Compression::Gzip,
            ),
            (
                "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
                Compression::Zstd,
            ),
            (DOCKER_GZIP, Compression::Gzip),
            (DOCKER_TAR, Compression::None),
        ];
        let mut layers = Vec::new();
        for (i, (mt, c)) in tars.iter().enumerate() {
            // Distinct blobs per media type.
            let t = layer(|l| {
                l.dir("m", 0o755).file("m/f", 0o644, b"media\n").file(
                    &format!("m/{i}"),
                    0o644,
                    mt.as_bytes(),
                );
            })?;
            layers.push(Layer::with_type(&t, *c, mt)?);
        }
        let unsupported = [
            "application/vnd.oci.image.layer.v1.tar+gzip+encrypted",
            "text/plain",
        ];
        for (i, mt) in unsupported.iter().enumerate() {
            let t = layer(|l| {
                l.file(&format!("u{i}"), 0o644, b"x");
            })?;
            layers.push(Layer::with_type(&t, Compression::Gzip, mt)?);
        }
        let img = images::archive(&w.work, &unique_name("media"), &layers, false)?;
        let mut o = ImportOpts::new(SN);
        o.no_unpack = true;
        oci::import_with(&w.ctd, &img, &o)?;
        let g = w.grpc()?;
        for (i, l) in img.layers.iter().enumerate() {
            let key = format!("e2e/media/{i}");
            let m = w.block_on(g.prepare(&key, ""))?;
            let dir = active_dir(&m)?;
            let r = w.block_on(g.apply(
                &descriptor(&l.blob.media_type, &l.blob.digest, l.blob.size),
                &m,
            ));
            if i < tars.len() {
                let d = r.with_context(|| format!("Apply of {}", l.blob.media_type))?;
                ensure!(
                    d.media_type == TAR && d.digest == l.diff_id,
                    "{}: Apply returned {d:?}, want {TAR} {}",
                    l.blob.media_type,
                    l.diff_id
                );
                let f = fs::File::open(dir.join("layer.erofs"))?;
                let im = erofs_image::Image::open(f)?;
                ensure!(im.superblock().uuid == World::differ_uuid(&l.blob.digest));
                ensure!(im.resolve(b"m/f").is_ok(), "m/f missing from the layer");
            } else {
                match r {
                    Err(s) if s.code() == Code::Unimplemented => {}
                    other => bail!(
                        "{}: expected Unimplemented, got {other:?}",
                        l.blob.media_type
                    ),
                }
                ensure!(!dir.join("layer.erofs").exists());
            }
            w.block_on(g.remove(&key))?;
        }
        // Mounts that are not an active snapshot of ours.
        let foreign = w.work.join("not-ours");
        fs::create_dir_all(&foreign)?;
        let l = &img.layers[0];
        let r = w.block_on(g.apply(
            &descriptor(&l.blob.media_type, &l.blob.digest, l.blob.size),
            &[containerd_api::containerd::types::Mount {
                r#type: "bind".into(),
                source: foreign.display().to_string(),
                target: String::new(),
                options: vec!["rw".into(), "rbind".into()],
            }],
        ));
        ensure!(
            matches!(&r, Err(s) if s.code() == Code::Unimplemented),
            "Apply on foreign mounts: {r:?}"
        );
        Ok(())
    })
}

/// Blobs the daemon cannot read from a content store directory come over containerd's
/// Content service (`content_root` pointing nowhere here), and are verified against their
/// digest while they stream: a blob altered in containerd's store fails the Apply.
#[test]
fn content_over_grpc() -> Result<()> {
    e2e(
        Setup {
            content_root: Some("/nonexistent/erofs-e2e-content".into()),
            ..Default::default()
        },
        |w| {
            let top = layer(|l| {
                l.file("over-grpc", 0o644, b"grpc\n").file(
                    "big",
                    0o644,
                    &images::noise(2 << 20, 9),
                );
            })?;
            let spec = oci::ImageSpec::new(&unique_name("grpc"))
                .layer(busybox()?, Compression::Gzip)
                .layer(top.clone(), Compression::Zstd);
            let img = oci::build_archive(&spec, &w.work)?;
            oci::import(&w.ctd, &img, SN)?;
            w.assert_unpacked_by_us(&img)?;
            ensure!(run_sh(w, &img.name, "cat /over-grpc")? == "grpc\n");

            // A plain tar blob changed behind containerd's back (one byte of file data, so
            // the tar still parses): containerd serves it as is, only the digest check of
            // our reader can notice.
            let other = layer(|l| {
                l.file("tampered", 0o644, &images::noise(1 << 20, 4));
            })?;
            let bad = images::archive(
                &w.work,
                &unique_name("tampered"),
                &[Layer::oci(&other, Compression::None)?],
                false,
            )?;
            let mut o = ImportOpts::new(SN);
            o.no_unpack = true;
            oci::import_with(&w.ctd, &bad, &o)?;
            let l = &bad.layers[0];
            let blob = w
                .ctd
                .content_root()
                .join("blobs/sha256")
                .join(l.blob.digest.trim_start_matches("sha256:"));
            let mut data = fs::read(&blob)?;
            let n = data.len();
            data[n / 2] ^= 0xff;
            fs::write(&blob, &data)?;
            let g = w.grpc()?;
            let m = w.block_on(g.prepare("e2e/tampered", ""))?;
            let dir = active_dir(&m)?;
            let r = w.block_on(g.apply(
                &descriptor(&l.blob.media_type, &l.blob.digest, l.blob.size),
                &m,
            ));
            let s = match r {
                Ok(d) => bail!("Apply of a tampered blob succeeded: {d:?}"),
                Err(s) => s,
            };
            eprintln!("tampered blob: {:?}: {}", s.code(), s.message());
            ensure!(
                s.message().contains("digest"),
                "the error does not say the blob does not match its digest: {}",
                s.message()
            );
            ensure!(!dir.join("layer.erofs").exists() && !dir.join("layer.erofs.tmp").exists());
            w.block_on(g.remove("e2e/tampered"))?;
            Ok(())
        },
    )
}

/// 2. Tar index mode: each `layer.erofs` is an index followed by the exact uncompressed
///    tar of its layer, and containers run on them.
#[test]
fn tar_index() -> Result<()> {
    e2e(
        Setup {
            tar_index: true,
            ..Default::default()
        },
        |w| {
            let base = busybox()?;
            let l2 = layer(|l| {
                l.dir("t", 0o755)
                    .file("t/zst", 0o644, b"index zstd\n")
                    .file("t/big", 0o644, &images::noise(3 << 20, 7));
            })?;
            let l3 = layer(|l| {
                l.dir("t", 0o755)
                    .file("t/tar", 0o644, b"index plain\n")
                    .whiteout("etc/group")
                    .symlink("t/link", "/t/zst")
                    .hardlink("t/hard", "t/tar");
            })?;
            let spec = oci::ImageSpec::new(&unique_name("tarindex"))
                .layer(base, Compression::Gzip)
                .layer(l2, Compression::Zstd)
                .layer(l3, Compression::None);
            let img = oci::build_archive(&spec, &w.work)?;
            oci::import(&w.ctd, &img, SN)?;
            w.assert_unpacked_by_us(&img)?;
            let by_uuid = w.layers_by_uuid()?;
            for ((tar, _), l) in spec.layers.iter().zip(&img.layers) {
                let p = &by_uuid[&World::differ_uuid(&l.blob.digest)];
                let data = fs::read(p)?;
                ensure!(
                    data.len() > tar.len() && data.ends_with(tar),
                    "{} ({} bytes) does not end with the {}-byte tar of {}",
                    p.display(),
                    data.len(),
                    tar.len(),
                    l.blob.digest
                );
                let index_len = data.len() - tar.len();
                ensure!(
                    index_len % 512 == 0,
                    "the tar starts at {index_len}, not on a 512-byte block"
                );
                eprintln!(
                    "{}: {index_len}-byte index + {}-byte tar",
                    l.blob.media_type,
                    tar.len()
                );
            }
            let out = run_sh(
                w,
                &img.name,
                "cat /t/zst /t/tar /t/link /t/hard; test -e /etc/group || echo gone; md5sum /t/big | cut -c1-32",
            )?;
            let big_md5 = {
                let out = std::process::Command::new("md5sum")
                    .stdin(std::process::Stdio::piped())
                    .stdout(std::process::Stdio::piped())
                    .spawn()
                    .and_then(|mut c| {
                        use std::io::Write;
                        c.stdin
                            .take()
                            .expect("stdin")
                            .write_all(&images::noise(3 << 20, 7))?;
                        c.wait_with_output()
                    })?;
                String::from_utf8_lossy(&out.stdout)[..32].to_string()
            };
            ensure!(
                out == format!(
                    "index zstd\nindex plain\nindex zstd\nindex plain\ngone\n{big_md5}\n"
                ),
                "container saw {out:?}"
            );
            // Compare reads committed tar-index layers too (file data from the embedded tar).
            // (Layer 0 has no parent: see compare_base_layer.)
            let tars: Vec<Vec<u8>> = spec.layers.iter().map(|(t, _)| t.clone()).collect();
            committed_diffs_match(w, &img, &tars, 1)?;
            Ok(())
        },
    )
}

/// 3. Native EROFS layers: `application/vnd.erofs.layer.v1` is copied as is, `+zstd`
///    decompressed; the config's diffIDs are the sha256 of the EROFS images.
///
///    containerd 2.1.9 does not know these media types (`images.IsLayerType` predates them:
///    it logs "encountered unknown type application/vnd.erofs.layer.v1" and unpacks nothing,
///    checked below), so the layers go through our Diff API the way its unpacker would send
///    them (Prepare on the parent, Apply, Commit), and a container runs on the result with
///    `ctr run --rootfs`.
#[test]
fn native_erofs() -> Result<()> {
    e2e(Setup::default(), |w| {
        let base = busybox()?;
        let top = layer(|l| {
            l.dir("n", 0o755)
                .file("n/file", 0o644, b"native zstd\n")
                .dir("run", 0o755)
                .whiteout("etc/group");
        })?;
        for (round, (zstd_base, zstd_top)) in [(false, true), (true, false)].into_iter().enumerate()
        {
            let layers = [
                Layer::erofs(&base, zstd_base)?,
                Layer::erofs(&top, zstd_top)?,
            ];
            let imgs: Vec<Vec<u8>> = layers
                .iter()
                .map(|l| {
                    Ok(if l.media_type == EROFS_ZSTD {
                        zstd::decode_all(&l.blob[..])?
                    } else {
                        l.blob.clone()
                    })
                })
                .collect::<Result<_>>()?;
            let img = images::archive(&w.work, &unique_name("native"), &layers, false)?;

            // What containerd 2.1.9 does with such an image: nothing.
            let before = w.applied().len();
            oci::import(&w.ctd, &img, SN)?;
            let log = fs::read_to_string(w.ctd.log_path())?;
            ensure!(log.contains("encountered unknown type application/vnd.erofs.layer.v1"));
            ensure!(
                w.applied().len() == before,
                "containerd 2.1.9 unpacked a native EROFS layer after all"
            );

            // The unpacker's calls, through the API.
            let g = w.grpc()?;
            let chains = oci::chain_ids(
                &img.layers
                    .iter()
                    .map(|l| l.diff_id.clone())
                    .collect::<Vec<_>>(),
            );
            let mut parent = String::new();
            for (i, l) in img.layers.iter().enumerate() {
                let key = format!("e2e/native/extract-{}", unique_name("x"));
                let m = w.block_on(g.prepare(&key, &parent))?;
                let dir = active_dir(&m)?;
                let d = w.block_on(g.apply(
                    &descriptor(&l.blob.media_type, &l.blob.digest, l.blob.size),
                    &m,
                ))?;
                ensure!(
                    d.media_type == EROFS
                        && d.digest == l.diff_id
                        && d.size as usize == imgs[i].len(),
                    "{}: Apply returned {d:?}, want {EROFS} {} {}",
                    l.blob.media_type,
                    l.diff_id,
                    imgs[i].len()
                );
                ensure!(
                    fs::read(dir.join("layer.erofs"))? == imgs[i],
                    "{}: layer.erofs is not the EROFS image byte for byte",
                    l.blob.media_type
                );
                let name = format!("e2e/native/{round}/{}", chains[i]);
                w.block_on(g.commit(&name, &key))?;
                parent = name;
            }
            w.assert_unpacked_by_us(&img)?;

            // A container on top.
            let cname = unique_name("native-rw");
            let m = w.block_on(g.prepare(&cname, &parent))?;
            let rootfs = trees::mount_rw(&m, &w.work.join(&cname))?;
            let mut ro = RunOpts::new(
                SN,
                &rootfs.path().display().to_string(),
                &[
                    "/bin/sh",
                    "-c",
                    "cat /n/file; test -e /etc/group || echo gone; echo hi > /n/written; cat /n/written",
                ],
            );
            ro.flags = vec!["--rootfs".into()];
            let out = w.ctd.run_with(&ro)?;
            let out = w.ctd.check(&out, "ctr run --rootfs")?;
            ensure!(out == "native zstd\ngone\nhi\n", "container saw {out:?}");
            drop(rootfs);
            w.block_on(g.remove(&cname))?;
        }
        Ok(())
    })
}

/// 4. Parallel unpack. containerd 2.1.9 has neither `max_concurrent_unpacks` (it logs
///    "Ignoring unknown key") nor the `rebase` capability check, so its unpacker always goes
///    layer by layer; the parallel path is driven through the API exactly as containerd 2.2
///    drives it: 10 parentless Prepares and Applies at once, then Commits in order, each
///    rebased on the previous chain. The merged tree equals the one of a sequential unpack
///    of the same image by containerd.
#[test]
fn parallel_unpack() -> Result<()> {
    e2e(
        Setup {
            max_concurrent_unpacks: Some(4),
            ..Default::default()
        },
        |w| {
            let log = fs::read_to_string(w.ctd.log_path())?;
            let ignored = log
                .lines()
                .find(|l| l.contains("max_concurrent_unpacks"))
                .context("containerd's log does not mention max_concurrent_unpacks")?;
            ensure!(
                ignored.to_lowercase().contains("unknown key"),
                "expected containerd 2.1 to ignore max_concurrent_unpacks, it logged: {ignored}"
            );

            let mut spec =
                oci::ImageSpec::new(&unique_name("ten")).layer(busybox()?, Compression::Gzip);
            let comps = [Compression::Zstd, Compression::None, Compression::Gzip];
            for i in 1..10 {
                let t = layer(|l| {
                    l.dir("layers", 0o755)
                        .file(&format!("layers/{i}"), 0o644, format!("{i}\n").as_bytes())
                        .file("shared", 0o644, format!("from {i}\n").as_bytes())
                        .file(
                            &format!("data{i}"),
                            0o600,
                            &images::noise(4 << 20, i as u64),
                        );
                    if i % 3 == 0 {
                        l.whiteout(&format!("layers/{}", i - 1));
                    }
                    if i == 5 {
                        l.opaque("layers");
                    }
                })?;
                spec = spec.layer(t, comps[i % 3]);
            }
            let img = oci::build_archive(&spec, &w.work)?;
            let mut o = ImportOpts::new(SN);
            o.no_unpack = true;
            oci::import_with(&w.ctd, &img, &o)?;

            let g = w.grpc()?;
            let t0 = Instant::now();
            let results = w.block_on(async {
                let mut handles = Vec::new();
                for (i, l) in img.layers.iter().enumerate() {
                    let g = g.clone();
                    let key = format!("e2e/par/extract-{i}");
                    let desc = descriptor(&l.blob.media_type, &l.blob.digest, l.blob.size);
                    handles.push(tokio::spawn(async move {
                        let start = t0.elapsed();
                        let m = g.prepare(&key, "").await?;
                        let d = g.apply(&desc, &m).await?;
                        Ok::<_, tonic::Status>((key, d, start, t0.elapsed()))
                    }));
                }
                let mut out = Vec::new();
                for h in handles {
                    out.push(h.await.expect("task"));
                }
                out
            });
            let chains = oci::chain_ids(
                &img.layers
                    .iter()
                    .map(|l| l.diff_id.clone())
                    .collect::<Vec<_>>(),
            );
            let mut parent = String::new();
            let (mut last_start, mut first_end) = (Duration::ZERO, Duration::MAX);
            for (i, r) in results.into_iter().enumerate() {
                let (key, d, start, end) = r.with_context(|| format!("layer {i}"))?;
                eprintln!("layer {i}: apply from {start:?} to {end:?}");
                last_start = last_start.max(start);
                first_end = first_end.min(end);
                ensure!(
                    d.digest == img.layers[i].diff_id,
                    "layer {i}: Apply returned {}, want {}",
                    d.digest,
                    img.layers[i].diff_id
                );
                let name = format!("e2e/par/{}", chains[i]);
                w.block_on(g.commit_with(&name, &key, Labels::new(), &parent))
                    .with_context(|| format!("commit of layer {i} onto {parent:?}"))?;
                parent = name;
            }
            ensure!(
                last_start < first_end,
                "the applies did not overlap: the last started at {last_start:?}, the first ended at {first_end:?}"
            );
            let par_view = w.block_on(g.view("e2e/par/view", &parent))?;
            let (lowers, upper) = trees::layers_of(&par_view)?;
            ensure!(
                lowers.len() == 10 && upper.is_none(),
                "view of the top: {par_view:?}"
            );
            let par = trees::mount_stack(&lowers, &w.work.join("par-view"))?;
            let par_tree = trees::tree(par.path())?;
            let shared = fs::read_to_string(par.path().join("shared"))?;
            ensure!(shared == "from 9\n", "shared = {shared:?}");
            let mut names: Vec<String> = fs::read_dir(par.path().join("layers"))?
                .map(|e| Ok(e?.file_name().to_string_lossy().into_owned()))
                .collect::<std::io::Result<_>>()?;
            names.sort();
            // Layer 5 made layers/ opaque (hiding 1-4), 6 deleted 5, 9 deleted 8.
            ensure!(names == ["6", "7", "9"], "layers/ = {names:?}");

            // The sequential unpack containerd itself does (ctr run unpacks a not-yet-unpacked
            // image on the client side through the diff service, i.e. through our differ).
            ensure!(run_sh(w, &img.name, "cat /shared")? == "from 9\n");
            let top = w
                .block_on(g.list(&[]))?
                .into_iter()
                .find(|i| i.name.ends_with(&format!("/{}", chains[9])) && i.kind == 3)
                .context("no committed snapshot for the top chain after ctr run")?;
            let seq_view = w.block_on(g.view("e2e/seq/view", &top.name))?;
            let (seq_lowers, _) = trees::layers_of(&seq_view)?;
            let seq = trees::mount_stack(&seq_lowers, &w.work.join("seq-view"))?;
            let seq_tree = trees::tree(seq.path())?;
            let d = trees::differences(&seq_tree, &par_tree);
            ensure!(
                d.is_empty(),
                "parallel vs sequential unpack:\n{}",
                d.join("\n")
            );
            ensure!(par_tree.nodes.len() > 20);
            Ok(())
        },
    )
}

/// 5. A layer whose content does not match the config's diffID: import and pull fail
///    cleanly and the extraction snapshot is removed.
#[test]
fn diff_id_mismatch() -> Result<()> {
    e2e(Setup::default(), |w| {
        let base = busybox()?;
        let bogus = oci::sha256_digest(b"not this layer");
        let top = layer(|l| {
            l.file("wrong", 0o644, b"diffid\n");
        })?;
        let img = images::archive(
            &w.work,
            &unique_name("baddiffid"),
            &[
                Layer::oci(&base, Compression::Gzip)?,
                Layer::oci(&top, Compression::Gzip)?.with_diff_id(&bogus),
            ],
            false,
        )?;
        let args = oci::import_args(w.ctd.version(), &img, &ImportOpts::new(SN))?;
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = w.ctd.ctr(&args)?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        ensure!(!out.status.success(), "import succeeded: {text}");
        ensure!(
            text.contains("diff id") || text.contains("diffID") || text.contains("diff_id"),
            "import failed without naming the diff id: {text}"
        );
        eprintln!("import: {}", text.trim());
        // Our differ did apply the layer (and said what it computed).
        let actual = &img.layers[1];
        ensure!(
            w.applied()
                .iter()
                .any(|a| a.layer == actual.blob.digest && a.diff_id == oci::sha256_digest(&top))
        );
        assert_failed_unpack_left_nothing(w)?;
        let chains = oci::chain_ids(&[img.layers[0].diff_id.clone(), bogus.clone()]);
        ensure!(
            !w.ctr_snapshots()?.iter().any(|(n, _, _)| n == &chains[1]),
            "a snapshot named after the bad chain exists"
        );

        // Pull: the same failure.
        let reg = Registry::start()?;
        let top2 = layer(|l| {
            l.file("wrong2", 0o644, b"diffid\n");
        })?;
        let img2 = images::archive(
            &w.work,
            &unique_name("baddiffid2"),
            &[
                Layer::oci(&base, Compression::Gzip)?,
                Layer::oci(&top2, Compression::Zstd)?.with_diff_id(&bogus),
            ],
            false,
        )?;
        let reference = reg.push_image(&img2)?;
        let out = w.ctd.ctr(&[
            "images",
            "pull",
            "--plain-http",
            "--snapshotter",
            SN,
            &reference,
        ])?;
        ensure!(!out.status.success(), "pull of a bad diffID succeeded");
        assert_failed_unpack_left_nothing(w)?;

        // And the daemon still unpacks good images.
        let good = oci::build_archive(
            &oci::ImageSpec::new(&unique_name("good"))
                .layer(base, Compression::Gzip)
                .layer(top, Compression::Gzip),
            &w.work,
        )?;
        oci::import(&w.ctd, &good, SN)?;
        w.assert_unpacked_by_us(&good)?;
        ensure!(run_sh(w, &good.name, "cat /wrong")? == "diffid\n");
        Ok(())
    })
}

/// What the container of [`compare`] does to its image's tree.
const CHANGES: &str = "set -e
echo changed >> /etc/passwd
rm /etc/group
echo new > /etc/added
ln /etc/added /etc/added-link
rm -rf /opt/app && mkdir /opt/app && echo fresh > /opt/app/only
ln /opt/lib/data /opt/lib/data-link
chmod 600 /opt/lib/conf
rm -rf /opt/gone
rm /opt/lib/extra
ln -s ../etc/added /opt/sym
mkdir -p /new/deep/dir && echo deep > /new/deep/dir/f
mkfifo /new/fifo
echo three-changed > /opt/top/file
echo done";

/// 6. Compare: a container on a 3-layer image changes, deletes and adds files; the diff
///    `ctr snapshots diff` makes (gzip, through the diff service and our Diff.Diff), applied
///    on the parent layers, reproduces the container's tree. zstd and plain diffs through
///    the Diff API carry the same tar.
#[test]
fn compare() -> Result<()> {
    e2e(Setup::default(), |w| {
        let l2 = layer(|l| {
            l.dir("opt", 0o755)
                .dir("opt/app", 0o755)
                .file("opt/app/a", 0o644, b"a\n")
                .file("opt/app/b", 0o644, b"b\n")
                .dir("opt/lib", 0o755)
                .file("opt/lib/data", 0o644, b"data\n")
                .file("opt/lib/conf", 0o644, b"conf\n")
                .dir("opt/gone", 0o755)
                .file("opt/gone/x", 0o644, b"x\n")
                .dir("opt/gone/sub", 0o700)
                .file("opt/gone/sub/y", 0o644, b"y\n")
                .dir("opt/keep", 0o755)
                .file("opt/keep/z", 0o644, b"z\n")
                .file("opt/keep/w", 0o644, b"w\n");
        })?;
        let l3 = layer(|l| {
            l.dir("opt/top", 0o755)
                .file("opt/top/file", 0o644, b"three\n")
                .file("opt/lib/extra", 0o755, b"extra\n")
                .whiteout("opt/keep/z");
        })?;
        let spec = oci::ImageSpec::new(&unique_name("cmp"))
            .layer(busybox()?, Compression::Gzip)
            .layer(l2, Compression::Zstd)
            .layer(l3, Compression::None);
        let img = oci::build_archive(&spec, &w.work)?;
        oci::import(&w.ctd, &img, SN)?;
        w.assert_unpacked_by_us(&img)?;
        // Each committed layer, diffed against its parent, gives its own content back.
        // (Layer 0 has no parent: see compare_base_layer.)
        let tars: Vec<Vec<u8>> = spec.layers.iter().map(|(t, _)| t.clone()).collect();
        committed_diffs_match(w, &img, &tars, 1)?;

        let cid = unique_name("cmp");
        let script = CHANGES;
        let mut ro = RunOpts::new(SN, &img.name, &["/bin/sh", "-c", script]);
        ro.id = Some(cid.clone());
        ro.rm = false;
        let out = w.ctd.run_with(&ro)?;
        ensure!(w.ctd.check(&out, "ctr run")? == "done\n");

        // The container's snapshot, straight from the daemon.
        let g = w.grpc()?;
        let info = w
            .block_on(g.list(&[]))?
            .into_iter()
            .find(|i| i.name.ends_with(&format!("/{cid}")))
            .context("no snapshot for the container")?;
        let cmounts = w.block_on(g.mounts(&info.name))?;
        let (lowers, upper) = trees::layers_of(&cmounts)?;
        let upper = upper.context("the container snapshot has no upper directory")?;
        ensure!(lowers.len() == 3, "{cmounts:?}");

        // ctr snapshots diff: gzip through containerd's diff service.
        let out = ctr_snapshots_diff(w, &[&cid])?;
        ensure!(
            out.status.success(),
            "ctr snapshots diff: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let tar = decompress("gzip", &out.stdout).context("the diff is not gzip")?;
        let mut names = Vec::new();
        let mut r = erofs_image::tar::TarReader::new(&tar[..]);
        while let Some(e) = r.next_entry()? {
            names.push(e.display_path());
        }
        for want in [
            "etc/.wh.group",
            "etc/added",
            "opt/app/.wh..wh..opq",
            "opt/app/only",
            "opt/.wh.gone",
            "opt/lib/.wh.extra",
            "opt/lib/data-link",
        ] {
            ensure!(
                names.iter().any(|n| n == want),
                "{want} not in the diff: {names:?}"
            );
        }
        ensure!(
            !names.iter().any(|n| n.starts_with("opt/keep")),
            "unchanged opt/keep in the diff: {names:?}"
        );

        // Applied on the parent: the diff as an EROFS layer over the parent's layers.
        let diff_img = w.work.join("diff.erofs");
        {
            let f = fs::File::create(&diff_img)?;
            let opts = erofs_image::BuildOptions {
                oci_whiteouts: true,
                ..Default::default()
            };
            erofs_image::tar_to_image(&tar[..], &f, &opts)?;
        }
        let diff_mnt = trees::mount_erofs(&diff_img, &w.work.join("diff-layer"))?;
        let mut applied = vec![diff_mnt.path().to_path_buf()];
        applied.extend(lowers.iter().cloned());
        let applied_mnt = trees::mount_stack(&applied, &w.work.join("applied"))?;
        let mut container = vec![upper.clone()];
        container.extend(lowers.iter().cloned());
        let container_mnt = trees::mount_stack(&container, &w.work.join("container"))?;
        let want = trees::tree(container_mnt.path())?;
        let got = trees::tree(applied_mnt.path())?;
        ensure!(
            want.nodes
                .contains_key(std::path::Path::new("opt/app/only"))
                && !want.nodes.contains_key(std::path::Path::new("opt/app/a"))
                && !want.links.is_empty(),
            "the container tree is not what the script made"
        );
        eprintln!(
            "diff entries: {names:?}\ncontainer tree: {} paths, hardlink groups {:?}",
            want.nodes.len(),
            want.links
        );
        let d = trees::differences(&want, &got);
        ensure!(
            d.is_empty(),
            "the diff applied on the parent differs from the container:\n{}",
            d.join("\n")
        );

        // The Diff API with zstd and plain tar: the same tar, stored in containerd's content
        // store (under a lease) with the uncompressed-digest label.
        let lease = unique_name("lease");
        w.ctd.ctr_ok(&["leases", "create", "--id", &lease])?;
        let lower_view = w.block_on(g.view("e2e/cmp/lower", &info.parent))?;
        for mt in [
            "application/vnd.oci.image.layer.v1.tar+zstd",
            "application/vnd.oci.image.layer.v1.tar",
        ] {
            let d = w.block_on(g.compare(&lower_view, &cmounts, mt, Some(&lease)))?;
            ensure!(d.media_type == mt, "{d:?}");
            let out = w.ctd.ctr(&["content", "get", &d.digest])?;
            ensure!(out.status.success(), "ctr content get {}", d.digest);
            ensure!(oci::sha256_digest(&out.stdout) == d.digest);
            let t = decompress(mt, &out.stdout)?;
            ensure!(
                t == tar,
                "{mt}: the tar differs from the gzip diff's ({} vs {} bytes)",
                t.len(),
                tar.len()
            );
            let ls = w.ctd.ctr_ok(&["content", "ls"])?;
            let row = ls
                .lines()
                .find(|l| l.starts_with(&d.digest))
                .context("diff not listed by ctr content ls")?;
            if mt.ends_with("zstd") {
                let label = format!("containerd.io/uncompressed={}", oci::sha256_digest(&tar));
                ensure!(row.contains(&label), "no {label} on {row}");
            }
        }
        w.block_on(g.remove("e2e/cmp/lower"))?;
        Ok(())
    })
}

/// Compare with a parentless lower side: `ctr snapshots diff` of an image's base layer
/// (containerd's `rootfs.CreateDiff` views the empty parent "" as the lower side) must give
/// the base layer's content back, as the walking differ does.
///
/// The read-only bind mount of that empty View used to be taken for a committed layer
/// ("opening ROOT/snapshots/N/layer.erofs: No such file or directory").
#[test]
fn compare_base_layer() -> Result<()> {
    e2e(Setup::default(), |w| {
        let base = busybox()?;
        let spec = oci::ImageSpec::new(&unique_name("base")).layer(base.clone(), Compression::Gzip);
        let img = oci::build_archive(&spec, &w.work)?;
        oci::import(&w.ctd, &img, SN)?;
        w.assert_unpacked_by_us(&img)?;
        committed_diffs_match(w, &img, &[base], 0)
    })
}

/// Diffing the same changes twice: the second diff's blob is already in containerd's content
/// store, which must be fine (upstream commits with the expected digest and accepts
/// AlreadyExists).
///
/// containerd's Content.Write refuses an expected digest it has already when the writer
/// opens, not only at COMMIT; the second `ctr snapshots diff` used to fail with "content
/// sha256:...: already exists".
#[test]
fn compare_twice() -> Result<()> {
    e2e(Setup::default(), |w| {
        let top = layer(|l| {
            l.file("twice", 0o644, b"twice\n");
        })?;
        let spec = oci::ImageSpec::new(&unique_name("twice"))
            .layer(busybox()?, Compression::Gzip)
            .layer(top, Compression::Gzip);
        let img = oci::build_archive(&spec, &w.work)?;
        oci::import(&w.ctd, &img, SN)?;
        let chain = img.chain_id();
        let first = w.ctd.snapshots(SN, &["diff", &chain])?;
        w.ctd.check(&first, "first ctr snapshots diff")?;
        // The first diff's blob stays in the store (as if an image referenced it).
        let digest = oci::sha256_digest(&first.stdout);
        w.ctd
            .ctr_ok(&["content", "label", &digest, "containerd.io/gc.root=e2e"])?;
        let out = w.ctd.snapshots(SN, &["diff", &chain])?;
        if !out.status.success() {
            bail!(
                "the second diff of the same snapshot failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    })
}

/// A diff written through our Diff API without a lease (containerd 2.1 does not forward the
/// caller's lease to proxy differs: the request carries none) must survive a garbage
/// collection long enough for the caller to read or reference it.
///
/// Without a lease the content is unreferenced the moment it is committed and the next
/// collection deletes it; through containerd that showed as an intermittent "content digest
/// sha256:...: not found" from `ctr snapshots diff`. The daemon now takes an expiring lease
/// of its own (`containerd.io/gc.expire`, one hour) when the request has none.
#[test]
fn compare_content_survives_gc() -> Result<()> {
    e2e(Setup::default(), |w| {
        let top = layer(|l| {
            l.file("gc", 0o644, b"gc\n");
        })?;
        let spec = oci::ImageSpec::new(&unique_name("gc"))
            .layer(busybox()?, Compression::Gzip)
            .layer(top, Compression::Gzip);
        let img = oci::build_archive(&spec, &w.work)?;
        oci::import(&w.ctd, &img, SN)?;
        let chains = oci::chain_ids(
            &img.layers
                .iter()
                .map(|l| l.diff_id.clone())
                .collect::<Vec<_>>(),
        );
        let g = w.grpc()?;
        let names = w.block_on(g.list(&[]))?;
        let name_of = |chain: &str| {
            names
                .iter()
                .find(|i| i.name.ends_with(&format!("/{chain}")))
                .map(|i| i.name.clone())
                .with_context(|| format!("no snapshot for {chain}"))
        };
        let lower = w.block_on(g.view("e2e/gc/lower", &name_of(&chains[0])?))?;
        let upper = w.block_on(g.view("e2e/gc/upper", &name_of(&chains[1])?))?;
        let d = w.block_on(g.compare(
            &lower,
            &upper,
            "application/vnd.oci.image.layer.v1.tar+gzip",
            None,
        ))?;
        w.ctd.ctr_ok(&["content", "get", &d.digest])?;
        // Any garbage collection: here a synchronous one.
        let lease = unique_name("gc");
        w.ctd.ctr_ok(&["leases", "create", "--id", &lease])?;
        w.ctd.ctr_ok(&["leases", "delete", "--sync", &lease])?;
        let out = w.ctd.ctr(&["content", "get", &d.digest])?;
        ensure!(
            out.status.success(),
            "the diff {} was garbage-collected right after Diff returned: {}",
            d.digest,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(())
    })
}

/// 7. Bad input through the Diff API: corrupt gzip, truncated zstd, path traversal,
///    hostile native EROFS blobs. Each Apply fails with a clear error, leaves no layer
///    behind, and the daemon keeps serving; through `ctr images import` a corrupt layer fails
///    the unpack cleanly.
#[test]
fn bad_input() -> Result<()> {
    e2e(Setup::default(), |w| {
        let base = busybox()?;
        let payload = layer(|l| {
            l.dir("p", 0o755)
                .file("p/big", 0o644, &images::noise(1 << 20, 3))
                .file("p/text", 0o644, &b"text ".repeat(100_000));
        })?;
        let mut corrupt_gz = Compression::Gzip.compress(&payload)?;
        let mid = corrupt_gz.len() / 2;
        for b in &mut corrupt_gz[mid..mid + 64] {
            *b ^= 0x5a;
        }
        let mut truncated_zst = Compression::Zstd.compress(&payload)?;
        truncated_zst.truncate(truncated_zst.len() / 2);
        let traversal = images::tar_with_raw_path("../x", b"escaped\n")?;
        let traversal_deep = images::tar_with_raw_path("a/../../../etc/x", b"escaped\n")?;
        let real = images::erofs_image_of(&payload)?;
        // A valid superblock block (checksum included), then garbage where the metadata is.
        let mut hostile = real[..4096].to_vec();
        hostile.extend(images::noise(real.len().max(64 << 10) - 4096, 11));
        let gz_tar = "application/vnd.oci.image.layer.v1.tar+gzip";
        let zst_tar = "application/vnd.oci.image.layer.v1.tar+zstd";
        let cases: Vec<(&str, Layer, &[&str])> = vec![
            (
                "corrupt gzip",
                Layer::raw(corrupt_gz.clone(), gz_tar, "sha256:0"),
                &["gzip", "deflate", "corrupt", "checksum", "invalid"],
            ),
            (
                "truncated zstd",
                Layer::raw(truncated_zst, zst_tar, "sha256:0"),
                &["zstd", "unexpected end", "eof", "truncated", "incomplete"],
            ),
            (
                "path traversal",
                Layer::raw(traversal.clone(), TAR, "sha256:0"),
                &["..", "path", "travers", "outside"],
            ),
            (
                "deep path traversal (gzip)",
                Layer::raw(
                    Compression::Gzip.compress(&traversal_deep)?,
                    gz_tar,
                    "sha256:0",
                ),
                &["..", "path", "travers", "outside"],
            ),
            (
                "hostile native EROFS",
                Layer::raw(hostile.clone(), EROFS, "sha256:0"),
                &["erofs", "check", "invalid", "corrupt"],
            ),
            (
                "hostile native EROFS (zstd)",
                Layer::raw(zstd::encode_all(&hostile[..], 3)?, EROFS_ZSTD, "sha256:0"),
                &["erofs", "check", "invalid", "corrupt"],
            ),
            (
                "random bytes as native EROFS",
                Layer::raw(images::noise(64 << 10, 5), EROFS, "sha256:0"),
                &["erofs", "superblock", "magic", "invalid", "check"],
            ),
            (
                "unknown native suffix",
                Layer::raw(
                    real.clone(),
                    "application/vnd.erofs.layer.v1+lz4",
                    "sha256:0",
                ),
                &["suffix"],
            ),
        ];
        let mut layers: Vec<Layer> = vec![Layer::oci(&base, Compression::Gzip)?];
        layers.extend(cases.iter().map(|(_, l, _)| l.clone()));
        let img = images::archive(&w.work, &unique_name("bad"), &layers, false)?;
        let mut o = ImportOpts::new(SN);
        o.no_unpack = true;
        oci::import_with(&w.ctd, &img, &o)?;
        let g = w.grpc()?;
        let mut report = Vec::new();
        for (i, (what, _, words)) in cases.iter().enumerate() {
            let l = &img.layers[i + 1];
            let key = format!("e2e/bad/{i}");
            let m = w.block_on(g.prepare(&key, ""))?;
            let dir = active_dir(&m)?;
            let r = w.block_on(g.apply(
                &descriptor(&l.blob.media_type, &l.blob.digest, l.blob.size),
                &m,
            ));
            let s = match r {
                Ok(d) => bail!("{what}: Apply succeeded: {d:?}"),
                Err(s) => s,
            };
            report.push(format!("{what}: {:?}: {}", s.code(), s.message()));
            ensure!(
                !matches!(s.code(), Code::Unimplemented | Code::Unknown | Code::Ok),
                "{what}: Apply failed with {:?} (Unimplemented would fall through to the walking differ): {}",
                s.code(),
                s.message()
            );
            let msg = s.message().to_lowercase();
            ensure!(
                words.iter().any(|k| msg.contains(k)),
                "{what}: the error does not say what is wrong: {}",
                s.message()
            );
            for f in ["layer.erofs", "layer.erofs.tmp"] {
                ensure!(
                    !dir.join(f).exists(),
                    "{what}: {f} left in {}",
                    dir.display()
                );
            }
            w.ensure_daemon_running()?;
            w.block_on(g.remove(&key))?;
        }
        eprintln!("{}", report.join("\n"));

        // The daemon keeps serving: a good layer applies and commits.
        let l = &img.layers[0];
        let m = w.block_on(g.prepare("e2e/bad/good", ""))?;
        let d = w.block_on(g.apply(
            &descriptor(&l.blob.media_type, &l.blob.digest, l.blob.size),
            &m,
        ))?;
        ensure!(d.digest == l.diff_id);
        w.block_on(g.commit("e2e/bad/good-committed", "e2e/bad/good"))?;
        w.block_on(g.remove("e2e/bad/good-committed"))?;
        w.block_on(g.cleanup())?;

        // Through containerd: a corrupt layer fails the import, nothing is left, and a good
        // image still unpacks and runs.
        let broken = images::archive(
            &w.work,
            &unique_name("broken"),
            &[
                Layer::oci(&base, Compression::Gzip)?,
                Layer::raw(corrupt_gz, gz_tar, &oci::sha256_digest(&payload)),
            ],
            false,
        )?;
        let args = oci::import_args(w.ctd.version(), &broken, &ImportOpts::new(SN))?;
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = w.ctd.ctr(&args)?;
        ensure!(!out.status.success(), "import of a corrupt layer succeeded");
        eprintln!(
            "import of a corrupt gzip layer: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        assert_failed_unpack_left_nothing(w)?;
        w.ensure_daemon_running()?;
        let good = oci::build_archive(
            &oci::ImageSpec::new(&unique_name("after"))
                .layer(base, Compression::Gzip)
                .layer(payload, Compression::Zstd),
            &w.work,
        )?;
        oci::import(&w.ctd, &good, SN)?;
        w.assert_unpacked_by_us(&good)?;
        ensure!(run_sh(w, &good.name, "wc -c < /p/text")?.trim() == "500000");
        Ok(())
    })
}
