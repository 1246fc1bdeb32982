//! The node side of registry layer artifacts, end to end: containerd 2.1's CRI plugin (snapshot
//! annotations on, so the image reference reaches us) pulls from a local registry (Debian's
//! `docker-registry`, which has no Referrers API: artifacts are found through the referrers
//! tag) through our differ with tar index and dm-verity on, and the daemon fetches each layer's
//! tar index, tree and signature. The artifacts are built here with the libraries the
//! differ uses (`erofs_image`, `snapshotter::integrity::dmverity`) and pushed as the format
//! says (`erofs_registry::artifacts`).
//!
//! 1. `fetched_artifacts_are_used_and_equal_local_layers`: `erofs-snapshotter artifacts build`
//!    and `push` (the producer) attach signed artifacts to a three-layer image; every layer
//!    uses its fetched artifacts (log lines, `erofs_snapshotter_artifacts_total{outcome="used"}`);
//!    each `layer.erofs` is byte for byte the locally built `[index][tar][tree]`, and the same
//!    image pulled from a repository without artifacts is computed locally into the very same
//!    files.
//! 2. `bad_or_missing_artifacts_fall_back`: a tampered index, a tampered tree, a signature by
//!    an untrusted key, and no artifacts: each pull succeeds with locally computed layers,
//!    one warning and one count per layer under its outcome.
//! 3. `hanging_registry_falls_back_in_bounded_time`: the artifact lookup goes (hosts.toml
//!    mirror) to a listener that accepts and never answers; the pull succeeds after about
//!    `fetch_timeout`, counted as a timeout.
//! 4. `required_signatures_refuse_unsigned_layers`: with `require_signed_root_hash`, a layer
//!    signed by the trusted key is used, and pulls of layers with an untrusted signature or
//!    none fail with FailedPrecondition, leaving no layer behind.
//! 5. `https_registry_from_hosts_toml_with_ca_and_client_certificate`: hosts.toml sends the
//!    lookups to an HTTPS registry (certificate for 127.0.0.1, client certificates required)
//!    with its `ca` and `client`: the artifacts are used; without `ca` the layers are computed
//!    locally, counted as `tls`; with `skip_verify` instead they are used again.
//! 6. `full_image_nodes_use_the_full_image_tree`: a node with tar index off and dm-verity on;
//!    the producer's `artifacts build --full-image` and `push`: every layer uses the fetched
//!    full-image tree, and each `layer.erofs` is byte for byte what the node computes from a
//!    repository without artifacts. Artifacts built with other `--mkfs-option`s than the
//!    node's `mkfs_options` are not used (`bad_tree`, one warning per layer).

// Only part of the parser is used here.
#[path = "artifacts_node/producer.rs"]
mod producer;
#[allow(dead_code)]
#[path = "operator/prom.rs"]
mod prom;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use erofs_registry::signature::SecretKey;
use producer::{Built, Push, build_layer, push_artifacts};
use testsuite::cri::{CriClient, CriConfig};
use testsuite::oci::{Compression, ImageSpec, LayerBuilder, OciArchive};
use testsuite::proxied_containerd::{Env, EnvOpts, SN};
use testsuite::{Registry, Version, with_timeout};

const BIN: &str = env!("CARGO_BIN_EXE_erofs-snapshotter");
const LIMIT: Duration = Duration::from_secs(300);
const FETCH_TIMEOUT_SECS: u64 = 3;

fn e2e(f: fn() -> Result<()>) {
    with_timeout(LIMIT, move || {
        if let Err(e) = f() {
            panic!("{e:#}");
        }
    });
}

/// Run `erofs-snapshotter ARGS`: its stdout, or an error with both outputs.
fn cli(args: &[&str]) -> Result<String> {
    let o = std::process::Command::new(BIN).args(args).output()?;
    ensure!(
        o.status.success(),
        "erofs-snapshotter {args:?}: {}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

/// An image of `n` small layers (gzip and zstd) with content unique to `name`.
fn image(name: &str, n: usize) -> Result<ImageSpec> {
    let mut spec = ImageSpec::new(&format!("testsuite/{name}:1"));
    for i in 0..n {
        let mut l = LayerBuilder::new();
        l.dir(&format!("d{i}"), 0o755);
        l.file(
            &format!("d{i}/{name}"),
            0o644,
            format!("{name} layer {i}\n").as_bytes(),
        );
        let big: Vec<u8> = (0..200_000u32)
            .map(|k| (k.wrapping_mul(2_654_435_761) >> (i + 3)) as u8)
            .collect();
        l.file(&format!("d{i}/data.bin"), 0o600, &big);
        l.symlink(&format!("d{i}/link"), "data.bin");
        let c = if i % 2 == 0 {
            Compression::Gzip
        } else {
            Compression::Zstd
        };
        spec = spec.layer(l.finish()?, c);
    }
    Ok(spec)
}

/// Our daemon (tar index, dm-verity, artifacts on) under containerd 2.1's CRI plugin, a
/// registry, keys.
struct World {
    env: Env,
    reg: Registry,
    cri: CriClient,
    key: SecretKey,
    other: SecretKey,
    metrics: PathBuf,
    scratch: tempfile::TempDir,
}

impl World {
    /// `extra`: more `[artifacts]` keys; `hosts`: registry host -> hosts.toml text for our
    /// daemon's `hosts_dir`.
    fn start(extra: &str, hosts: &[(String, String)], reg: Registry) -> Result<World> {
        World::start_with("enable_tar_index = true\n", extra, hosts, reg)
    }

    /// [`World::start`] with `differ`: the daemon's `enable_tar_index` line.
    fn start_with(
        differ: &str,
        extra: &str,
        hosts: &[(String, String)],
        reg: Registry,
    ) -> Result<World> {
        let scratch = tempfile::tempdir()?;
        let key = SecretKey::generate()?;
        let other = SecretKey::generate()?;
        let pubkey = scratch.path().join("trusted.pub");
        std::fs::write(&pubkey, key.public().to_text())?;
        let hosts_dir = scratch.path().join("certs.d");
        std::fs::create_dir_all(&hosts_dir)?;
        for (host, text) in hosts {
            std::fs::create_dir_all(hosts_dir.join(host))?;
            std::fs::write(hosts_dir.join(host).join("hosts.toml"), text)?;
        }
        let metrics = scratch.path().join("metrics.sock");
        // The pause image is never pulled: no pod runs.
        let cfg = CriConfig::new(SN, "127.0.0.1:1/none:1").plain_http(&reg.host());
        let daemon_config = format!(
            "{differ}enable_dmverity = true\n\
             [metrics]\naddress = \"unix:{}\"\n\
             [artifacts]\nenabled = true\nhosts_dir = {:?}\nfetch_timeout = \"{FETCH_TIMEOUT_SECS}s\"\n\
             trusted_keys = [{:?}]\n{extra}",
            metrics.display(),
            hosts_dir,
            pubkey,
        );
        let env = Env::start_opts(
            Path::new(BIN),
            Version::V2_1,
            EnvOpts {
                cri: Some(cfg),
                daemon_config,
                ..EnvOpts::default()
            },
        )?;
        let cri = CriClient::connect(env.ctd.address())?;
        cri.wait_ready(Duration::from_secs(30))?;
        Ok(World {
            env,
            reg,
            cri,
            key,
            other,
            metrics,
            scratch,
        })
    }

    /// Build `spec`, push it as `repo:1`, build its layers' artifacts: (archive, ref, built).
    fn image(&self, spec: &ImageSpec, repo: &str) -> Result<(OciArchive, String, Vec<Built>)> {
        let archive = self.env.build(spec)?;
        let reference = self.reg.push_as(&archive, repo, "1")?;
        let dir = self.scratch.path().join(repo.replace('/', "_"));
        std::fs::create_dir_all(&dir)?;
        let built = archive
            .layers
            .iter()
            .map(|l| build_layer(&archive, l, &dir))
            .collect::<Result<Vec<_>>>()?;
        Ok((archive, reference, built))
    }

    fn push(&self, repo: &str, archive: &OciArchive, built: &[Built], how: Push) -> Result<()> {
        push_artifacts(&self.reg, repo, archive, built, how, &self.key, &self.other)
    }

    fn scrape(&self) -> Result<prom::Scrape> {
        use std::io::Write;
        let mut s = std::os::unix::net::UnixStream::connect(&self.metrics)?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
        let mut resp = String::new();
        s.read_to_string(&mut resp)?;
        let (_, body) = resp.split_once("\r\n\r\n").context("no response head")?;
        prom::parse(body)
    }

    fn outcome(&self, outcome: &str) -> Result<f64> {
        self.scrape()?
            .get("erofs_snapshotter_artifacts_total", &[("outcome", outcome)])
            .with_context(|| format!("no artifacts counter for {outcome}"))
    }

    /// The daemon's artifact log lines about `layer`.
    fn lines_about(&self, layer: &str) -> Vec<String> {
        self.env
            .daemon_log(100_000)
            .lines()
            .filter(|l| l.contains(layer) && l.contains("artifacts"))
            .map(str::to_string)
            .collect()
    }

    /// sha256 of every layer.erofs in our store.
    fn layer_files(&self) -> Result<Vec<String>> {
        Ok(self.env.layer_hashes()?.into_values().collect())
    }

    /// Remove image `reference` and wait until containerd's collector took its layers.
    fn remove(&self, reference: &str) -> Result<()> {
        self.cri.remove_image(reference)?;
        self.env
            .wait_until("the image's layers to be collected", || {
                Ok(self.env.layer_hashes()?.is_empty())
            })
    }
}

/// Every layer of `built` was used from the registry (one log line each), and its file is
/// the locally built one.
fn assert_used(w: &World, built: &[Built]) -> Result<()> {
    let files = w.layer_files()?;
    for b in built {
        one_line(w, &b.layer_digest, USED_FULL)?;
        ensure!(
            files.contains(&b.file_sha),
            "layer {}: no layer.erofs is the locally built one ({}); store has {files:?}",
            b.layer_digest,
            b.file_sha
        );
    }
    Ok(())
}

/// Every layer of `built` fell back with `outcome` (one warning each) and its file is the
/// locally built one.
fn assert_fell_back(w: &World, built: &[Built], outcome: &str) -> Result<()> {
    let files = w.layer_files()?;
    for b in built {
        one_line(w, &b.layer_digest, &["WARN", &format!("outcome={outcome}")])?;
        ensure!(files.contains(&b.file_sha), "layer {}", b.layer_digest);
    }
    Ok(())
}

/// What the line of a layer that used its artifacts (full tree check) says.
const USED_FULL: &[&str] = &[
    "used layer artifacts from the registry",
    "tree_check=\"full\"",
];

/// The daemon logged exactly one artifacts line about `layer`, and it says all of `want`.
fn one_line(w: &World, layer: &str, want: &[&str]) -> Result<()> {
    let lines = w.lines_about(layer);
    ensure!(
        lines.len() == 1 && want.iter().all(|n| lines[0].contains(n)),
        "layer {layer}: want one line with {want:?}: {lines:#?}"
    );
    Ok(())
}

#[test]
fn fetched_artifacts_are_used_and_equal_local_layers() {
    e2e(|| {
        let w = World::start("", &[], Registry::start()?)?;
        let (archive, reference, built) = w.image(&image("art-used", 3)?, "testsuite/art-used")?;
        // Built and pushed by the producer's commands, from the registry, signed with the
        // key the node trusts.
        let key = w.scratch.path().join("signing.key");
        std::fs::write(&key, w.key.to_text())?;
        let out = w.scratch.path().join("out");
        let key = key.to_str().context("utf-8 path")?;
        let out = out.to_str().context("utf-8 path")?;
        cli(&[
            "artifacts",
            "build",
            &reference,
            "--plain-http",
            out,
            "--sign-key",
            key,
        ])?;
        let pushed = cli(&["artifacts", "push", out, &reference, "--plain-http"])?;
        ensure!(pushed.contains("referrers tag"), "{pushed}");
        w.cri.pull_image(&reference)?;
        assert_used(&w, &built)?;
        ensure!(w.outcome("used")? == 3.0);
        // The same image from a repository without artifacts: computed locally, into the
        // same bytes.
        w.remove(&reference)?;
        let plain = w.reg.push_as(&archive, "testsuite/art-plain", "1")?;
        w.cri.pull_image(&plain)?;
        let files = w.layer_files()?;
        for b in &built {
            ensure!(
                files.contains(&b.file_sha),
                "local {} differs",
                b.layer_digest
            );
        }
        ensure!(w.outcome("used")? == 3.0);
        ensure!(w.outcome("absent")? == 3.0);
        Ok(())
    });
}

#[test]
fn bad_or_missing_artifacts_fall_back() {
    e2e(|| {
        let w = World::start("", &[], Registry::start()?)?;
        for (name, how, outcome) in [
            ("art-bad-index", Some(Push::TamperIndex), "bad_index"),
            ("art-bad-tree", Some(Push::TamperTree), "bad_tree"),
            ("art-untrusted", Some(Push::Untrusted), "bad_signature"),
            // Signed and consistent, but not this data's tree: this node may mount without
            // dm-verity (dmverity_mode "auto"), so the tree is checked against the data.
            ("art-other-data", Some(Push::OtherData), "bad_tree"),
            ("art-none", None, "absent"),
        ] {
            let repo = format!("testsuite/{name}");
            let before = w.outcome(outcome).unwrap_or(0.0);
            let (archive, reference, built) = w.image(&image(name, 2)?, &repo)?;
            if let Some(how) = how {
                w.push(&repo, &archive, &built, how)?;
            }
            w.cri
                .pull_image(&reference)
                .with_context(|| format!("{name}: the pull must not fail"))?;
            assert_fell_back(&w, &built, outcome).with_context(|| name.to_string())?;
            let counted = w.outcome(outcome)? - before;
            ensure!(
                counted == 2.0,
                "{name}: {counted} layers counted as {outcome}"
            );
        }
        ensure!(w.outcome("used")? == 0.0);
        Ok(())
    });
}

#[test]
fn hanging_registry_falls_back_in_bounded_time() {
    e2e(|| {
        let reg = Registry::start()?;
        // Accepts connections and never answers.
        let hang = std::net::TcpListener::bind("127.0.0.1:0")?;
        let hang_addr = hang.local_addr()?;
        let hosts = format!(
            "server = \"http://{}\"\n[host.\"http://{hang_addr}\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
            reg.host()
        );
        let w = World::start("", &[(reg.host(), hosts)], reg)?;
        let (archive, reference, built) = w.image(&image("art-hang", 2)?, "testsuite/art-hang")?;
        w.push("testsuite/art-hang", &archive, &built, Push::Good)?;
        let t = Instant::now();
        w.cri.pull_image(&reference)?;
        let took = t.elapsed();
        assert_fell_back(&w, &built, "timeout")?;
        ensure!(w.outcome("timeout")? == 2.0);
        // Each layer waited about fetch_timeout, no longer.
        ensure!(
            took < Duration::from_secs(2 * FETCH_TIMEOUT_SECS + 10),
            "pull took {took:?}"
        );
        drop(hang);
        Ok(())
    });
}

#[test]
fn required_signatures_refuse_unsigned_layers() {
    e2e(|| {
        let w = World::start("require_signed_root_hash = true\n", &[], Registry::start()?)?;
        let (archive, reference, built) = w.image(&image("req-good", 2)?, "testsuite/req-good")?;
        w.push("testsuite/req-good", &archive, &built, Push::Good)?;
        w.cri.pull_image(&reference)?;
        assert_used(&w, &built)?;
        w.remove(&reference)?;
        for (name, how) in [
            ("req-untrusted", Some(Push::Untrusted)),
            ("req-unsigned", Some(Push::Unsigned)),
            ("req-none", None),
        ] {
            let repo = format!("testsuite/{name}");
            let (archive, reference, built) = w.image(&image(name, 2)?, &repo)?;
            if let Some(how) = how {
                w.push(&repo, &archive, &built, how)?;
            }
            let Err(e) = w.cri.pull_image(&reference) else {
                bail!("{name}: the pull succeeded without a valid signature");
            };
            let msg = format!("{e:#}");
            ensure!(msg.contains("require_signed_root_hash"), "{name}: {msg}");
            ensure!(w.layer_files()?.is_empty(), "{name}: a layer was left");
        }
        Ok(())
    });
}

#[test]
fn https_registry_from_hosts_toml_with_ca_and_client_certificate() {
    e2e(|| {
        // containerd pulls from the plain registry; our daemon's hosts.toml sends the
        // artifact lookups to an HTTPS twin over the same storage that requires a client
        // certificate.
        let reg = Registry::start()?;
        let certs = tempfile::tempdir()?;
        let pki = testsuite::tls::Pki::generate(certs.path())?;
        let https = reg.start_tls_twin(&testsuite::registry::RegistryTls {
            cert: pki.server_cert.clone(),
            key: pki.server_key.clone(),
            client_cas: vec![pki.client_ca.clone()],
        })?;
        let host = reg.host();
        let w = World::start("", &[], reg)?;
        // hosts.toml is read for every lookup: written (and rewritten) after the start,
        // with paths relative to it, as containerd allows.
        let dir = w.scratch.path().join("certs.d").join(&host);
        std::fs::create_dir_all(&dir)?;
        for (from, to) in [
            (&pki.ca, "ca.pem"),
            (&pki.client_cert, "client.pem"),
            (&pki.client_key, "client.key"),
        ] {
            std::fs::copy(from, dir.join(to))?;
        }
        let hosts = |trust: &str| {
            format!(
                "server = \"https://{}\"\n{trust}\nclient = [[\"client.pem\", \"client.key\"]]\n[header]\n  x-erofs-test = \"1\"\n",
                https.host(),
            )
        };
        std::fs::write(dir.join("hosts.toml"), hosts("ca = \"ca.pem\""))?;
        let (archive, reference, built) = w.image(&image("art-tls", 2)?, "testsuite/art-tls")?;
        w.push("testsuite/art-tls", &archive, &built, Push::Good)?;
        w.cri.pull_image(&reference)?;
        assert_used(&w, &built)?;
        ensure!(w.outcome("used")? == 2.0);

        // Without the CA the registry's certificate is refused: computed locally, counted
        // as tls.
        std::fs::write(dir.join("hosts.toml"), hosts(""))?;
        let (archive, reference, built) =
            w.image(&image("art-tls-noca", 2)?, "testsuite/art-tls-noca")?;
        w.push("testsuite/art-tls-noca", &archive, &built, Push::Good)?;
        w.cri.pull_image(&reference)?;
        assert_fell_back(&w, &built, "tls")?;
        ensure!(w.outcome("tls")? == 2.0);
        let log = w.env.daemon_log(100_000);
        ensure!(log.contains("unknown issuer"), "no reason logged");
        ensure!(w.outcome("used")? == 2.0);

        // skip_verify: any certificate goes (with a warning); the client certificate is
        // still sent.
        std::fs::write(dir.join("hosts.toml"), hosts("skip_verify = true"))?;
        let (archive, reference, built) =
            w.image(&image("art-tls-skip", 2)?, "testsuite/art-tls-skip")?;
        w.push("testsuite/art-tls-skip", &archive, &built, Push::Good)?;
        w.cri.pull_image(&reference)?;
        assert_used(&w, &built)?;
        ensure!(w.outcome("used")? == 4.0);
        let log = w.env.daemon_log(100_000);
        ensure!(
            log.matches("TLS certificate verification is off").count() == 1,
            "one skip_verify warning per endpoint"
        );
        drop(w);
        drop(https);
        Ok(())
    });
}

#[test]
fn full_image_nodes_use_the_full_image_tree() {
    e2e(|| {
        let reg = Registry::start()?;
        let w = World::start_with("enable_tar_index = false\n", "", &[], reg)?;
        let key = w.scratch.path().join("signing.key");
        std::fs::write(&key, w.key.to_text())?;
        let key = key.to_str().context("utf-8 path")?;
        // The producer: build (signed, with the full images' trees) and push.
        let produce = |name: &str, mkfs: &[&str]| -> Result<(OciArchive, String)> {
            let archive = w.env.build(&image(name, 3)?)?;
            let reference = w.reg.push_as(&archive, &format!("testsuite/{name}"), "1")?;
            let out = w.scratch.path().join(name);
            let out = out.to_str().context("utf-8 path")?;
            let mut args = vec![
                "artifacts",
                "build",
                &reference,
                "--plain-http",
                out,
                "--sign-key",
                key,
                "--full-image",
            ];
            args.extend_from_slice(mkfs);
            cli(&args)?;
            let pushed = cli(&["artifacts", "push", out, &reference, "--plain-http"])?;
            ensure!(pushed.contains("referrers tag"), "{pushed}");
            Ok((archive, reference))
        };
        let (archive, reference) = produce("full-used", &[])?;
        w.cri.pull_image(&reference)?;
        for l in &archive.layers {
            one_line(&w, &l.blob.digest, USED_FULL)?;
        }
        ensure!(w.outcome("used")? == 3.0);
        let mut fetched = w.layer_files()?;
        fetched.sort();
        ensure!(fetched.len() == 3, "{fetched:?}");
        // The same image from a repository without artifacts: computed locally, into the
        // same bytes.
        w.remove(&reference)?;
        let plain = w.reg.push_as(&archive, "testsuite/full-plain", "1")?;
        w.cri.pull_image(&plain)?;
        let mut local = w.layer_files()?;
        local.sort();
        ensure!(local == fetched, "fetched {fetched:?}, computed {local:?}");
        ensure!(w.outcome("absent")? == 3.0);
        w.remove(&plain)?;

        // Built with mkfs options the node does not have (its mkfs_options are the
        // defaults): another image, so not its tree.
        let (archive, reference) = produce("full-other", &["--mkfs-option=-T0"])?;
        w.cri.pull_image(&reference)?;
        for l in &archive.layers {
            one_line(&w, &l.blob.digest, &["WARN", "outcome=bad_tree"])?;
        }
        ensure!(w.outcome("bad_tree")? == 3.0);
        ensure!(w.outcome("used")? == 3.0);
        Ok(())
    });
}
