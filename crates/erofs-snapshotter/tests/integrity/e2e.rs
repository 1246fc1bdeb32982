//! End to end through containerd 2.1: an image unpacked by our differ into immutable layers,
//! containers on a size-limited writable layer (ENOSPC inside the container), and a
//! container in a user namespace whose layers are idmapped mounts (`ctr run --uidmap
//! --remap-labels`, the proxy configured with the `remap-ids` capability).

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use erofs_image::tar::{Entry, EntryKind};
use testsuite::mounts::self_mounts;
use testsuite::oci::{self, Compression, ImageSpec, LayerBuilder};
use testsuite::{
    Containerd, ContainerdOpts, ProxyKind, ProxyPlugin, RunOpts, UnpackConfig, Version, unique_name,
};

use crate::common::{BIN, Cfg, Env, block_on, is_immutable};

const SNAPSHOTTER: &str = "erofs-rs";
const DIFFER: &str = "erofs-rs-diff";

/// The committed layers under the daemon root.
fn layers(env: &Env) -> Result<Vec<std::path::PathBuf>> {
    let mut v = Vec::new();
    for e in fs::read_dir(env.snapshots_dir())? {
        let p = e?.path().join("layer.erofs");
        if p.exists() {
            v.push(p);
        }
    }
    Ok(v)
}

fn top_layer() -> Result<Vec<u8>> {
    let mut l = LayerBuilder::new();
    l.file("etc/motd", 0o644, b"integrity e2e\n")
        .dir("home", 0o755);
    let mut d = Entry::new(b"home/user".to_vec(), EntryKind::Directory);
    d.mode = 0o755;
    d.uid = 1000;
    d.gid = 1000;
    d.mtime = oci::FIXED_MTIME;
    l.entry(&d, &[]);
    let mut f = Entry::new(b"home/user/file".to_vec(), EntryKind::Regular);
    f.mode = 0o644;
    f.uid = 1000;
    f.gid = 1000;
    f.mtime = oci::FIXED_MTIME;
    l.entry(&f, b"user\n");
    l.finish()
}

fn output(ctd: &Containerd, o: &RunOpts) -> Result<String> {
    let out = ctd.run_with(o)?;
    Ok(format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    ))
}

/// What a container prints about its user namespace, file owners and a write past the quota.
const SCRIPT: &str = "id -u; id -g; read a b c < /proc/self/uid_map; echo $a $b $c; \
    stat -c '%u:%g %n' / /bin/busybox /etc/passwd /etc/motd /home/user/file; \
    echo hi > /tmp/x && stat -c '%u:%g %n' /tmp/x; \
    echo '--- ls -ln /'; ls -ln /; echo '---'; \
    dd if=/dev/zero of=/big bs=1M count=64; echo \"dd exit $?\"; stat -c 'big %s' /big";

/// Every entry of `ls -ln /` (between the markers of [`SCRIPT`]) is owned by 0:0.
fn check_ls_root(out: &str) -> Result<()> {
    let listing = out
        .split_once("--- ls -ln /\n")
        .and_then(|(_, rest)| rest.split_once("---\n"))
        .map(|(l, _)| l)
        .context("no ls -ln / output")?;
    let mut n = 0;
    for line in listing.lines().filter(|l| !l.starts_with("total")) {
        let f: Vec<&str> = line.split_whitespace().collect();
        // The runtime's proc and sysfs mounts belong to the host's root (65534 inside).
        if matches!(f.last(), Some(&"proc") | Some(&"sys")) {
            continue;
        }
        ensure!(
            f.len() >= 4 && f[2] == "0" && f[3] == "0",
            "ls -ln /: {line:?} is not owned by 0:0"
        );
        n += 1;
    }
    ensure!(n >= 8, "ls -ln / listed {n} entries:\n{listing}");
    Ok(())
}

fn check_quota(out: &str) -> Result<()> {
    ensure!(
        out.contains("No space left on device"),
        "writing past the quota did not fail with ENOSPC:\n{out}"
    );
    ensure!(out.contains("dd exit 1"), "{out}");
    let big: u64 = out
        .lines()
        .find_map(|l| l.strip_prefix("big "))
        .context("no size of /big")?
        .trim()
        .parse()?;
    ensure!(
        (8 << 20..16 << 20).contains(&big),
        "/big is {big} bytes on a 16 MiB writable layer"
    );
    Ok(())
}

#[test]
fn container_on_immutable_quota_idmapped_layers() {
    testsuite::require_root().unwrap();
    assert!(
        Version::V2_1.available(),
        "containerd 2.1 is not installed (scripts/setup)"
    );
    let mut plugin = ProxyPlugin::new(SNAPSHOTTER, ProxyKind::Snapshot, Path::new("erofs/s.sock"));
    plugin.capabilities = vec!["rebase".into(), "remap-ids".into()];
    let opts = ContainerdOpts::new(Version::V2_1)
        .proxy_plugin(plugin)
        .proxy_differ(DIFFER, Path::new("erofs/s.sock"))
        .diff_service_default(&[DIFFER, "walking"])
        .unpack(UnpackConfig::new(SNAPSHOTTER, Some(DIFFER)));
    let mut ctd = Containerd::prepare(opts).unwrap();
    let dir = ctd.dir("erofs").unwrap();
    assert_eq!(ctd.proxy_address(SNAPSHOTTER), Some(dir.join("s.sock")));
    let cfg = Cfg::new()
        .sn("set_immutable = true")
        .sn("default_size = \"16MB\"")
        .df(&format!(
            "content_root = {:?}",
            ctd.content_root().display().to_string()
        ))
        .df(&format!(
            "containerd_address = {:?}",
            ctd.address().display().to_string()
        ));
    // Dropped before `ctd`: the daemon stops and its mounts go first.
    let mut env = Env::in_dir(BIN, dir, cfg, true).unwrap();
    let r = block_on(async {
        env.start().await?;
        ctd.launch()?;
        body(&ctd, &env).await
    });
    if let Err(e) = r {
        let chain: Vec<String> = e.chain().map(|c| c.to_string()).collect();
        panic!(
            "{}\n--- containerd log tail ---\n{}",
            chain.join("\n  caused by: "),
            ctd.log_tail(40)
        );
    }
    env.stop().unwrap();
}

async fn body(ctd: &Containerd, env: &Env) -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let spec = ImageSpec::new(&unique_name("integrity"))
        .layer(oci::busybox_base_layer()?, Compression::Gzip)
        .layer(top_layer()?, Compression::Zstd);
    let archive = oci::build_archive(&spec, tmp.path())?;
    oci::import(ctd, &archive, SNAPSHOTTER)?;
    ensure!(
        env.log_text().contains("applied layer"),
        "the layers were not unpacked by our differ"
    );

    // Every layer of the image is immutable.
    let ls = layers(env)?;
    ensure!(ls.len() == 2, "expected 2 layers, found {ls:?}");
    for l in &ls {
        ensure!(is_immutable(l)?, "{} is not immutable", l.display());
    }

    // A plain container on a 16 MiB writable layer.
    let out = output(
        ctd,
        &RunOpts::new(SNAPSHOTTER, &archive.name, &["/bin/sh", "-c", SCRIPT]),
    )?;
    eprintln!("--- plain container ---\n{out}");
    ensure!(out.starts_with("0\n0\n0 0 4294967295\n"), "{out}");
    ensure!(out.contains("1000:1000 /home/user/file"), "{out}");
    check_ls_root(&out)?;
    check_quota(&out)?;

    // In a user namespace, with idmapped layers.
    let mut o = RunOpts::new(SNAPSHOTTER, &archive.name, &["/bin/sh", "-c", SCRIPT]);
    o.flags = [
        "--uidmap",
        "0:100000:65536",
        "--gidmap",
        "0:100000:65536",
        "--remap-labels",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let out = output(ctd, &o)?;
    eprintln!("--- container in a user namespace ---\n{out}");
    let want = "0\n0\n0 100000 65536\n0:0 /\n0:0 /bin/busybox\n0:0 /etc/passwd\n0:0 /etc/motd\n\
        1000:1000 /home/user/file\n0:0 /tmp/x\n";
    ensure!(
        out.starts_with(want),
        "inside the user namespace:\n{out}\nwanted it to start with:\n{want}"
    );
    check_ls_root(&out)?;
    check_quota(&out)?;
    // The daemon presented both layers through idmapped mounts.
    let idmapped: Vec<_> = self_mounts()?
        .into_iter()
        .filter(|m| {
            m.mount_point.starts_with(env.snapshots_dir())
                && m.mount_point
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("idmap-"))
        })
        .collect();
    ensure!(
        idmapped.len() == 2
            && idmapped
                .iter()
                .all(|m| m.mount_options.iter().any(|o| o == "idmapped")),
        "idmapped layer mounts: {idmapped:?}"
    );
    // The immutable flag is still there after all this.
    for l in &ls {
        ensure!(is_immutable(l)?, "{} lost its immutable flag", l.display());
    }

    // Removing the image: containerd's GC removes the snapshots; Remove clears the flag.
    ctd.ctr_ok(&["images", "rm", "--sync", &archive.name])?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left = layers(env)?;
        if left.is_empty() {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "layers left 30 s after the image was removed: {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}
