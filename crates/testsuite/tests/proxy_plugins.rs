//! Proxy plugins wired through the harness, with a recording fake snapshotter
//! and differ (tests/common/fake_proxy.rs): which calls reach them, and with
//! which `containerd-namespace` gRPC header. Needs root; `--test-threads=1`.

mod common;

use std::path::Path;
use std::time::Duration;

use common::fake_proxy::{ApplyMode, Call, FakeProxy, summarize};
use testsuite::oci::{self, Compression, ImageSpec, ImportOpts, LayerBuilder, OciArchive};
use testsuite::with_timeout;
use testsuite::{Containerd, ContainerdOpts, UnpackConfig, Version, unique_name};

/// The namespace `ctr` uses in these tests (not `default`, to see it travel).
const NS: &str = "testsuite-ns";

fn image(dir: &Path) -> OciArchive {
    let mut top = LayerBuilder::new();
    top.file("etc/motd", 0o644, b"via proxy\n")
        .whiteout("etc/group");
    // A unique bottom layer, so no two images share a chain id.
    let name = unique_name("proxied");
    let mut bottom = LayerBuilder::new();
    bottom.file("image-name", 0o644, name.as_bytes());
    let spec = ImageSpec::new(&name)
        .layer(bottom.finish().unwrap(), Compression::None)
        .layer(oci::busybox_base_layer().unwrap(), Compression::Gzip)
        .layer(top.finish().unwrap(), Compression::Zstd);
    oci::build_archive(&spec, dir).unwrap()
}

fn show(what: &str, calls: &[Call]) {
    println!("  {what}:");
    for (m, ns) in summarize(calls) {
        println!("    {m:<20} containerd-namespace: {}", ns.join(", "));
    }
}

/// containerd prepared first, with the proxy's socket given relative to its
/// base directory; then the proxy, with its root below the base directory too
/// (the layout a real proxy daemon needs, for its mounts to reach containerd);
/// then containerd launched.
fn start(version: Version) -> (Containerd, FakeProxy) {
    let sock = Path::new("fake/fake.sock");
    let mut opts = ContainerdOpts::new(version)
        .proxy_snapshotter("fake", sock)
        .namespace(NS);
    if version.proxy_diff() {
        opts = opts
            .proxy_differ("fake-diff", sock)
            .diff_service_default(&["fake-diff", "walking"])
            .unpack(UnpackConfig::new("fake", Some("fake-diff")));
    }
    let mut ctd = Containerd::prepare(opts).unwrap();
    let sock = ctd.proxy_address("fake").unwrap();
    assert!(sock.starts_with(ctd.base_dir()));
    let root = ctd.dir("fake/root").unwrap();
    let proxy = FakeProxy::start(&sock, &root, &ctd.content_root(), ApplyMode::Extract);
    ctd.launch().unwrap();
    (ctd, proxy)
}

fn run_check(ctd: &Containerd) -> impl Fn(&str) {
    move |image: &str| {
        let out = ctd
            .run("fake", image, &["/bin/sh", "-c", "cat /etc/motd; ls /etc"])
            .unwrap();
        let stdout = ctd.check(&out, "ctr run").unwrap();
        assert!(stdout.starts_with("via proxy\n"), "{stdout}");
        assert!(
            stdout.contains("passwd") && !stdout.contains("group"),
            "{stdout}"
        );
    }
}

fn namespaces(calls: &[Call], method: &str) -> Vec<Option<String>> {
    calls
        .iter()
        .filter(|c| c.method == method)
        .map(|c| c.namespace.clone())
        .collect()
}

#[test]
fn containerd_1_6_proxy_snapshotter_namespace_header() {
    with_timeout(Duration::from_secs(300), || {
        let dir = tempfile::tempdir().unwrap();
        let (ctd, proxy) = start(Version::V1_6);
        let img = image(dir.path());
        println!("containerd 1.6, proxy snapshotter `fake` (a proxy differ cannot be configured):");
        oci::import(&ctd, &img, "fake").unwrap();
        let import = proxy.take_calls();
        show("ctr images import --snapshotter fake", &import);
        run_check(&ctd)(&img.name);
        let run = proxy.take_calls();
        show("ctr run --snapshotter fake", &run);
        let out = ctd.snapshots("fake", &["ls"]).unwrap();
        ctd.check(&out, "ctr snapshots ls").unwrap();
        let out = ctd.snapshots("fake", &["usage"]).unwrap();
        ctd.check(&out, "ctr snapshots usage").unwrap();
        show(
            "ctr snapshots --snapshotter fake ls/usage",
            &proxy.take_calls(),
        );

        // containerd 1.6 forwards no namespace header to proxy plugins.
        for c in import.iter().chain(&run) {
            assert_eq!(c.namespace, None, "1.6 forwarded a namespace header: {c:?}");
        }
        assert!(!namespaces(&import, "Snapshots.Prepare").is_empty());
        assert!(!namespaces(&import, "Snapshots.Commit").is_empty());
        assert!(!namespaces(&run, "Snapshots.Prepare").is_empty());
    });
}

#[test]
fn containerd_2_1_proxy_snapshotter_and_differ_namespace_header() {
    with_timeout(Duration::from_secs(300), || {
        let dir = tempfile::tempdir().unwrap();
        let (ctd, proxy) = start(Version::V2_1);
        println!("containerd 2.1, proxy snapshotter `fake` and proxy differ `fake-diff`:");

        // Transfer service: unpack_config {fake, fake-diff}.
        let img = image(dir.path());
        oci::import(&ctd, &img, "fake").unwrap();
        let import = proxy.take_calls();
        show(
            "ctr images import --snapshotter fake (transfer service)",
            &import,
        );
        run_check(&ctd)(&img.name);
        let run = proxy.take_calls();
        show("ctr run --snapshotter fake", &run);

        // Client-side import: snapshots and diff services (diff-service default).
        let img2 = image(dir.path());
        let mut o = ImportOpts::new("fake");
        o.local = true;
        oci::import_with(&ctd, &img2, &o).unwrap();
        let local = proxy.take_calls();
        show(
            "ctr images import --local --snapshotter fake (diff service)",
            &local,
        );
        run_check(&ctd)(&img2.name);
        proxy.take_calls();

        // Three layers each, applied by the proxy differ on both paths.
        assert_eq!(namespaces(&import, "Diff.Apply").len(), 3, "{import:?}");
        assert_eq!(namespaces(&local, "Diff.Apply").len(), 3, "{local:?}");
        // containerd 2.1 forwards the caller's namespace on every call made on
        // behalf of a request (its gRPC server copies the incoming header to
        // the outgoing context); garbage collection runs without one.
        for c in import.iter().chain(&run).chain(&local) {
            let background = ["Snapshots.List", "Snapshots.Remove", "Snapshots.Cleanup"];
            if background.contains(&c.method.as_str()) {
                assert_eq!(c.namespace, None, "{c:?}");
            } else {
                assert_eq!(c.namespace.as_deref(), Some(NS), "{c:?}");
            }
        }
    });
}

/// A proxy that starts listening only after containerd: the first calls may
/// fail while containerd's channel backs off (1.6 dials at start-up; 2.1
/// connects on first use), and `wait_for_snapshotter` rides that out.
#[test]
fn proxy_started_after_containerd() {
    with_timeout(Duration::from_secs(300), || {
        for version in Version::ALL {
            let mut opts =
                ContainerdOpts::new(version).proxy_snapshotter("late", Path::new("late/late.sock"));
            if version.transfer_service() {
                opts = opts.unpack(UnpackConfig::new("late", Some("walking")));
            }
            let ctd = Containerd::start(opts).unwrap();
            let sock = ctd.proxy_address("late").unwrap();
            // containerd already tried (1.6) and failed: nothing listens yet.
            let out = ctd.snapshots("late", &["prepare", "too-early"]).unwrap();
            assert!(!out.status.success());
            std::thread::sleep(Duration::from_millis(300));
            let root = ctd.dir("late/root").unwrap();
            let proxy = FakeProxy::start(&sock, &root, &ctd.content_root(), ApplyMode::Extract);
            let first = ctd
                .snapshots("late", &["prepare", "right-after-listen"])
                .unwrap();
            println!(
                "{version}: first call right after the proxy listens: {}",
                if first.status.success() {
                    "ok".to_owned()
                } else {
                    String::from_utf8_lossy(&first.stderr).trim().to_owned()
                }
            );
            let t = std::time::Instant::now();
            ctd.wait_for_snapshotter("late", Duration::from_secs(20))
                .unwrap();
            println!("{version}: proxy reachable after {:?}", t.elapsed());
            let dir = tempfile::tempdir().unwrap();
            let img = image(dir.path());
            oci::import(&ctd, &img, "late").unwrap();
            drop(proxy);
        }
    });
}
