//! Layer artifacts in a registry (issue 15, producer side and guest verification), against
//! Debian's `docker-registry` 2.8 on 127.0.0.1 (no Referrers API: the referrers-tag fallback)
//! and containerd 2.1 with our differ:
//!
//! - [`build_push_ls`]: `artifacts build` from a registry reference, an OCI archive and an
//!   image layout gives the same artifacts; `artifacts push` attaches them through the
//!   referrers tag; `artifacts ls` shows each layer's blobs, root hash and signature, which
//!   verifies with the signer's public key and not with another; what a node fetches through
//!   the client assembles into the layers `build` kept.
//! - [`artifacts_equal_differ_layers`]: those layers are byte for byte the `layer.erofs` our
//!   differ writes with `enable_tar_index` and `enable_dmverity`.
//! - [`full_image_trees_equal_the_differs`]: with `--full-image`, the (signed) tree of each
//!   layer's full image is the one the differ appends without tar index.
//! - [`verify_diff_id`]: `erofs-snapshotter verify` accepts the layer with its diffID, refuses a
//!   tampered tar byte and a wrong diffID; with `--layer-digest` it also rebuilds the index and
//!   refuses a forged one.
//!
//! The Referrers API branch of the client is tested against an in-process server in
//! crates/registry/tests/client.rs (no registry in Debian has the API).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use anyhow::{Context, Result, ensure};
use erofs_registry::artifacts::{ARTIFACT_TYPE, ArtifactSet};
use erofs_registry::client::{Client, ClientOptions, ReferrersVia};
use testsuite::oci::{self, Compression, ImageSpec, LayerBuilder, OciArchive};
use testsuite::wired_containerd::{SN, Setup, World};
use testsuite::{Registry, unique_name};

const BIN: &str = env!("CARGO_BIN_EXE_erofs-snapshotter");

fn cli(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .output()
        .expect("running erofs-snapshotter")
}

fn ok(args: &[&str]) -> Result<String> {
    let o = cli(args);
    ensure!(
        o.status.success(),
        "erofs-snapshotter {args:?} failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

/// A three-layer image: busybox (gzip), a layer with a 3 MiB file (zstd), a small layer with
/// a whiteout, links and an empty file (plain).
fn image(dir: &Path) -> Result<(ImageSpec, OciArchive)> {
    let l2 = {
        let mut l = LayerBuilder::new();
        l.dir("t", 0o755)
            .file("t/big", 0o644, &noise(3 << 20, 5))
            .file("t/small", 0o644, b"small\n");
        l.finish()?
    };
    let l3 = {
        let mut l = LayerBuilder::new();
        l.dir("t", 0o755)
            .file("t/empty", 0o644, b"")
            .whiteout("t/small")
            .symlink("t/link", "/t/big")
            .hardlink("t/hard", "t/empty");
        l.finish()?
    };
    let spec = ImageSpec::new(&unique_name("artifacts"))
        .layer(oci::busybox_base_layer()?, Compression::Gzip)
        .layer(l2, Compression::Zstd)
        .layer(l3, Compression::None);
    let img = oci::build_archive(&spec, dir)?;
    Ok((spec, img))
}

fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut r = fastrand::Rng::with_seed(seed);
    (0..len).map(|_| r.u8(..)).collect()
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// `index ‖ tar ‖ zeros up to hash_offset ‖ tree`: the layer a node assembles.
fn assemble(index: &[u8], tar: &[u8], hash_offset: u64, tree: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(hash_offset as usize + tree.len());
    v.extend_from_slice(index);
    v.extend_from_slice(tar);
    v.resize(hash_offset as usize, 0);
    v.extend_from_slice(tree);
    v
}

/// The layers of `set` assembled from the blobs `blob` returns.
fn assemble_all(
    set: &ArtifactSet,
    spec: &ImageSpec,
    img: &OciArchive,
    blob: impl Fn(&erofs_registry::artifacts::Descriptor) -> Result<Vec<u8>>,
) -> Result<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    for ((tar, _), l) in spec.layers.iter().zip(&img.layers) {
        let art = set
            .layer(&l.blob.digest)
            .with_context(|| format!("no artifacts for {}", l.blob.digest))?;
        ensure!(art.diff_id == l.diff_id, "diffID of {}", l.blob.digest);
        ensure!(art.tar_index.tar_size == tar.len() as u64);
        let t = art.dmverity.as_ref().context("no tree")?;
        let index = blob(&art.tar_index.descriptor)?;
        let tree = blob(&t.descriptor)?;
        out.push(assemble(&index, tar, t.hash_offset, &tree));
    }
    Ok(out)
}

fn from_outdir(out: &Path) -> impl Fn(&erofs_registry::artifacts::Descriptor) -> Result<Vec<u8>> {
    let out = out.to_path_buf();
    move |d| Ok(fs::read(out.join("blobs/sha256").join(&d.digest[7..]))?)
}

fn kept_layers(out: &Path, img: &OciArchive) -> Result<Vec<Vec<u8>>> {
    img.layers
        .iter()
        .map(|l| Ok(fs::read(out.join("layers").join(&l.diff_id[7..]))?))
        .collect()
}

fn set_of(out: &Path) -> Result<ArtifactSet> {
    Ok(ArtifactSet::parse(&fs::read(out.join("manifest.json"))?)?)
}

#[test]
fn build_push_ls() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (spec, img) = image(dir.path())?;
    let reg = Registry::start()?;
    let reference = reg.push_image(&img)?;
    let d = |n: &str| -> PathBuf { dir.path().join(n) };

    // Three sources, one result (the creation time aside).
    let key = d("signing.key");
    ok(&["artifacts", "keygen", s(&key)])?;
    let other = d("other.key");
    ok(&["artifacts", "keygen", s(&other)])?;
    ensure!(
        !cli(&["artifacts", "keygen", s(&key)]).status.success(),
        "keygen overwrote a key"
    );
    let built = ok(&[
        "artifacts",
        "build",
        &reference,
        "--plain-http",
        s(&d("from-registry")),
        "--sign-key",
        s(&key),
        "--keep-layers",
    ])?;
    eprintln!("{built}");
    ok(&["artifacts", "build", s(&img.path), s(&d("from-archive"))])?;
    ok(&[
        "artifacts",
        "build",
        s(&img.layout_dir),
        s(&d("from-layout")),
    ])?;
    let signed = set_of(&d("from-registry"))?;
    ensure!(signed.subject.digest == img.manifest.digest);
    ensure!(signed.layers.len() == 3);
    for other in ["from-archive", "from-layout"] {
        let mut o = set_of(&d(other))?;
        ensure!(o.layers.iter().all(|l| l.signature.is_none()));
        for (a, b) in o.layers.iter_mut().zip(&signed.layers) {
            a.signature = b.signature.clone();
        }
        ensure!(
            o.layers == signed.layers,
            "{other} differs from the registry build"
        );
    }
    let kept = kept_layers(&d("from-registry"), &img)?;
    ensure!(assemble_all(&signed, &spec, &img, from_outdir(&d("from-registry")))? == kept);

    // Push: docker-registry 2.8 has no Referrers API, so the referrers tag.
    let pushed = ok(&[
        "artifacts",
        "push",
        s(&d("from-registry")),
        &reference,
        "--plain-http",
    ])?;
    ensure!(pushed.contains("referrers tag sha256-"), "{pushed}");
    let wrong_target = cli(&[
        "artifacts",
        "push",
        s(&d("from-registry")),
        &format!("{}/nothere:v1", reg.host()),
        "--plain-http",
    ]);
    ensure!(
        !wrong_target.status.success()
            && String::from_utf8_lossy(&wrong_target.stderr).contains("not in the registry"),
        "{wrong_target:?}"
    );

    // ls: every layer, its blobs, root hash and signature.
    let pubkey = format!("{}.pub", s(&key));
    let listed = ok(&[
        "artifacts",
        "ls",
        &reference,
        "--plain-http",
        "--public-key",
        &pubkey,
    ])?;
    eprintln!("{listed}");
    ensure!(
        listed.contains("1 referrer(s)") && listed.contains("referrers tag"),
        "{listed}"
    );
    for l in &signed.layers {
        let t = l.dmverity.as_ref().unwrap();
        ensure!(listed.contains(&l.layer_digest), "{listed}");
        ensure!(listed.contains(&t.root_digest), "{listed}");
    }
    ensure!(listed.matches(": valid").count() == 3, "{listed}");
    let o = cli(&[
        "artifacts",
        "ls",
        &reference,
        "--plain-http",
        "--public-key",
        &format!("{}.pub", s(&other)),
    ]);
    let text = String::from_utf8_lossy(&o.stdout);
    ensure!(!o.status.success(), "a wrong key verified: {text}");
    ensure!(text.matches("INVALID").count() == 3, "{text}");

    // A second push (unsigned) replaces the first in the referrers tag.
    ok(&[
        "artifacts",
        "push",
        s(&d("from-layout")),
        &reference,
        "--plain-http",
    ])?;
    let listed = ok(&["artifacts", "ls", &reference, "--plain-http"])?;
    ensure!(
        listed.contains("1 referrer(s)") && listed.contains("signature      none"),
        "{listed}"
    );
    ok(&[
        "artifacts",
        "push",
        s(&d("from-registry")),
        &reference,
        "--plain-http",
    ])?;

    // What a node does: find the referrers by the manifest digest, fetch, assemble.
    let c = Client::new(&format!("http://{}", reg.host()), ClientOptions::default())?;
    let repo = img
        .repo
        .split_once('/')
        .map(|(_, r)| r)
        .unwrap_or(&img.repo);
    let (index, via) = c.referrers(repo, &img.manifest.digest, Some(ARTIFACT_TYPE))?;
    ensure!(
        via == ReferrersVia::Tag && index.manifests.len() == 1,
        "{index:?}"
    );
    let m = c.get_manifest(repo, &index.manifests[0].digest)?;
    let set = ArtifactSet::parse(&m.bytes)?;
    ensure!(set.layers == signed.layers);
    let fetched = assemble_all(&set, &spec, &img, |d| Ok(c.get_blob(repo, d, 64 << 20)?))?;
    ensure!(
        fetched == kept,
        "layers assembled from the registry differ from build's"
    );
    Ok(())
}

#[test]
fn artifacts_equal_differ_layers() -> Result<()> {
    let w = World::start(
        Path::new(BIN),
        Setup {
            tar_index: true,
            dmverity: true,
            ..Default::default()
        },
    )?;
    let (spec, img) = image(&w.work)?;
    let out = w.work.join("artifacts");
    ok(&[
        "artifacts",
        "build",
        s(&img.layout_dir),
        s(&out),
        "--keep-layers",
    ])?;
    let set = set_of(&out)?;
    let ours = assemble_all(&set, &spec, &img, from_outdir(&out))?;
    ensure!(ours == kept_layers(&out, &img)?);
    oci::import(&w.ctd, &img, SN)?;
    w.assert_unpacked_by_us(&img)?;
    let by_uuid = w.layers_by_uuid()?;
    for (l, mine) in img.layers.iter().zip(&ours) {
        let p = &by_uuid[&World::differ_uuid(&l.blob.digest)];
        let theirs = fs::read(p)?;
        ensure!(
            theirs.len() == mine.len(),
            "{}: the differ's layer has {} bytes, the artifacts give {}",
            l.blob.digest,
            theirs.len(),
            mine.len()
        );
        let first = theirs.iter().zip(mine).position(|(a, b)| a != b);
        ensure!(
            first.is_none(),
            "{}: the differ's layer differs from the artifacts' at byte {first:?}",
            l.blob.digest
        );
        eprintln!("{}: {} bytes, identical", l.blob.digest, theirs.len());
    }
    Ok(())
}

#[test]
fn full_image_trees_equal_the_differs() -> Result<()> {
    let w = World::start(
        Path::new(BIN),
        Setup {
            dmverity: true,
            ..Default::default()
        },
    )?;
    let (_spec, img) = image(&w.work)?;
    let out = w.work.join("artifacts");
    let key = w.work.join("k");
    ok(&["artifacts", "keygen", s(&key)])?;
    ok(&[
        "artifacts",
        "build",
        s(&img.layout_dir),
        s(&out),
        "--full-image",
        "--sign-key",
        s(&key),
    ])?;
    let set = set_of(&out)?;
    let public = erofs_registry::signature::PublicKey::from_text(&fs::read_to_string(format!(
        "{}.pub",
        s(&key)
    ))?)?;
    oci::import(&w.ctd, &img, SN)?;
    w.assert_unpacked_by_us(&img)?;
    let by_uuid = w.layers_by_uuid()?;
    for l in &img.layers {
        let art = set.layer(&l.blob.digest).context("no artifacts")?;
        let t = art.image_dmverity.as_ref().context("no image tree")?;
        let tree = fs::read(out.join("blobs/sha256").join(&t.descriptor.digest[7..]))?;
        let p = &by_uuid[&World::differ_uuid(&l.blob.digest)];
        let theirs = fs::read(p)?;
        ensure!(
            theirs.len() as u64 == t.hash_offset + tree.len() as u64
                && theirs[t.hash_offset as usize..] == tree[..],
            "{}: the differ's full image ({} bytes) does not end with the artifact's tree at {}",
            l.blob.digest,
            theirs.len(),
            t.hash_offset
        );
        let sidecar: serde_json::Value =
            serde_json::from_slice(&fs::read(p.with_file_name("layer.erofs.dmverity"))?)?;
        ensure!(sidecar["roothash"] == t.root_digest.as_str(), "{sidecar}");
        let sig = art
            .image_signature
            .as_ref()
            .context("image tree unsigned")?;
        let sig = fs::read(out.join("blobs/sha256").join(&sig.descriptor.digest[7..]))?;
        public.verify_root(&t.root_digest, &sig)?;
    }
    Ok(())
}

#[test]
fn verify_diff_id() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (_spec, img) = image(dir.path())?;
    let out = dir.path().join("out");
    ok(&[
        "artifacts",
        "build",
        s(&img.layout_dir),
        s(&out),
        "--keep-layers",
    ])?;
    let l = &img.layers[1];
    let layer = out.join("layers").join(&l.diff_id[7..]);
    let said = ok(&["verify", s(&layer), "--diff-id", &l.diff_id])?;
    ensure!(said.contains("has diffID"), "{said}");
    let set = set_of(&out)?;
    let tar_size = set
        .layer(&l.blob.digest)
        .unwrap()
        .tar_index
        .tar_size
        .to_string();
    ok(&[
        "verify",
        s(&layer),
        "--diff-id",
        &l.diff_id,
        "--tar-size",
        &tar_size,
    ])?;

    // The index too, rebuilt as the differ builds it for this layer.
    let said = ok(&[
        "verify",
        s(&layer),
        "--diff-id",
        &l.diff_id,
        "--layer-digest",
        &l.blob.digest,
    ])?;
    ensure!(said.contains("the index is the one it gives"), "{said}");
    let o = cli(&[
        "verify",
        s(&layer),
        "--diff-id",
        &l.diff_id,
        "--layer-digest",
        &img.layers[0].blob.digest,
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    ensure!(
        !o.status.success() && err.contains("is not the one the tar gives"),
        "{err}"
    );
    let mut forged = fs::read(&layer)?;
    forged[1280 + 60] ^= 1;
    let bad = dir.path().join("forged-index");
    fs::write(&bad, &forged)?;
    ok(&["verify", s(&bad), "--diff-id", &l.diff_id])?;
    let o = cli(&[
        "verify",
        s(&bad),
        "--diff-id",
        &l.diff_id,
        "--layer-digest",
        &l.blob.digest,
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    ensure!(
        !o.status.success() && err.contains("first difference at byte 1340"),
        "{err}"
    );

    // Another layer's diffID.
    let o = cli(&["verify", s(&layer), "--diff-id", &img.layers[0].diff_id]);
    let err = String::from_utf8_lossy(&o.stderr);
    ensure!(
        !o.status.success() && err.contains("not the diffID"),
        "{err}"
    );

    // One flipped byte in the middle of the tar.
    let mut data = fs::read(&layer)?;
    let index_len = set.layer(&l.blob.digest).unwrap().tar_index.descriptor.size as usize;
    data[index_len + 2 * 4096 + 17] ^= 0x20;
    let bad = dir.path().join("tampered");
    fs::write(&bad, &data)?;
    let o = cli(&["verify", s(&bad), "--diff-id", &l.diff_id]);
    let err = String::from_utf8_lossy(&o.stderr);
    ensure!(
        !o.status.success() && err.contains("not the diffID"),
        "{err}"
    );

    // Not a tar-index image at all.
    let o = cli(&[
        "verify",
        s(&img.blob_path(&l.blob.digest)),
        "--diff-id",
        &l.diff_id,
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    ensure!(
        !o.status.success() && err.contains("not a tar-index image"),
        "{err}"
    );
    Ok(())
}

/// `artifacts push` and `ls` over HTTPS against docker-registry with TLS (certificates made
/// here): trusted through `--ca` (the certificate is for the IP address 127.0.0.1), refused
/// without it with an unknown-issuer error, accepted with `--skip-verify`; a registry that
/// requires client certificates refuses a client without one or with one it does not trust,
/// and accepts ours, as a cert/key pair or as one file holding both; a certificate for another
/// name is refused.
#[test]
fn https_registry_ca_client_certificates_skip_verify() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = testsuite::tls::Pki::generate(&dir.path().join("pki"))?;
    let spec = {
        let mut l = LayerBuilder::new();
        l.dir("d", 0o755).file("d/f", 0o644, b"over https\n");
        ImageSpec::new(&unique_name("artifacts-tls")).layer(l.finish()?, Compression::Gzip)
    };
    let img = oci::build_archive(&spec, dir.path())?;
    // The image goes in through the plain registry; the TLS ones serve the same storage.
    let plain = Registry::start()?;
    let plain_ref = plain.push_image(&img)?;
    let tls = testsuite::registry::RegistryTls {
        cert: pki.server_cert.clone(),
        key: pki.server_key.clone(),
        client_cas: Vec::new(),
    };
    let https = plain.start_tls_twin(&tls)?;
    let mtls = plain.start_tls_twin(&testsuite::registry::RegistryTls {
        client_cas: vec![pki.client_ca.clone()],
        ..tls
    })?;
    let on = |r: &Registry| plain_ref.replacen(&plain.host(), &r.host(), 1);
    let out = dir.path().join("out");
    ok(&["artifacts", "build", s(&img.path), s(&out)])?;
    let ca = s(&pki.ca);

    // Trusted through --ca: push, then ls.
    let pushed = ok(&["artifacts", "push", s(&out), &on(&https), "--ca", ca])?;
    ensure!(pushed.contains("referrers tag sha256-"), "{pushed}");
    // `artifacts ls REF EXTRA...` lists the one referrer, or fails saying all of `why`.
    let lists = |r: &str, extra: &[&str]| -> Result<()> {
        let args = [&["artifacts", "ls", r][..], extra].concat();
        let listed = ok(&args)?;
        ensure!(listed.contains("1 referrer(s)"), "{args:?}: {listed}");
        Ok(())
    };
    let fails = |r: &str, extra: &[&str], why: &[&str]| -> Result<()> {
        let args = [&["artifacts", "ls", r][..], extra].concat();
        let o = cli(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        ensure!(
            !o.status.success() && why.iter().all(|w| err.contains(w)),
            "{args:?}: {err}"
        );
        Ok(())
    };
    lists(&on(&https), &["--ca", ca])?;
    // By name: the certificate's DNS name is checked as well.
    lists(
        &on(&https).replacen("127.0.0.1", "localhost", 1),
        &["--ca", ca],
    )?;
    // Without it: refused, saying why.
    fails(&on(&https), &[], &["unknown issuer", &https.host()])?;
    // --skip-verify: accepted (with a warning), no CA needed.
    let o = cli(&["artifacts", "ls", &on(&https), "--skip-verify"]);
    let err = String::from_utf8_lossy(&o.stderr);
    ensure!(
        o.status.success() && err.contains("skip_verify"),
        "{}{err}",
        String::from_utf8_lossy(&o.stdout)
    );
    // Plain HTTP to an HTTPS registry is an HTTP error, not a hang.
    fails(&on(&https), &["--plain-http"], &[])?;

    // Client certificates required: none, or one from another CA, is refused.
    let refused = ["refused the client certificate"];
    fails(&on(&mtls), &["--ca", ca], &refused)?;
    let stranger = [
        "--cert",
        s(&pki.stranger_cert),
        "--key",
        s(&pki.stranger_key),
    ];
    fails(
        &on(&mtls),
        &[&["--ca", ca][..], &stranger].concat(),
        &refused,
    )?;
    let client = ["--cert", s(&pki.client_cert), "--key", s(&pki.client_key)];
    lists(&on(&mtls), &[&["--ca", ca][..], &client].concat())?;
    // One PEM file with both.
    lists(&on(&mtls), &["--ca", ca, "--cert", s(&pki.client_both)])?;
    // A certificate by the trusted CA, but for another name.
    let elsewhere = plain.start_tls_twin(&testsuite::registry::RegistryTls {
        cert: pki.elsewhere_cert.clone(),
        key: pki.elsewhere_key.clone(),
        client_cas: Vec::new(),
    })?;
    fails(&on(&elsewhere), &["--ca", ca], &["not valid for 127.0.0.1"])?;
    drop(elsewhere);
    // A CA file that is not one: which file and why.
    fails(
        &on(&https),
        &["--ca", s(&pki.server_key)],
        &["server.key", "no CERTIFICATE"],
    )?;
    drop((mtls, https));
    Ok(())
}
