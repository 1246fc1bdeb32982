//! dm-verity from the differ (`enable_dmverity`): layers applied through the Diff service get
//! a veritysetup-format superblock and hash tree appended and a `layer.erofs.dmverity`
//! sidecar, for full images (4 KiB blocks), tar indexes (512-byte blocks) and native EROFS
//! layers; `veritysetup verify` accepts them and catches a flipped byte. The kernel here has
//! no dm-verity: `dmverity_mode = "on"` refuses to start, "auto" mounts without it, and
//! manager mode names the sidecar in `X-containerd.dmverity=`.

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, ensure};
use containerd_api::containerd::types::{Descriptor, Mount};

use crate::common::{BIN, Cfg, Env, flip_byte, gzip, run, run_ok};

/// The sidecar of a layer: `(roothash, hashoffset)`, checking it has exactly upstream's
/// fields.
fn sidecar(env: &Env, id: u64) -> Result<(String, u64)> {
    let p = env.snapshot_dir(id).join("layer.erofs.dmverity");
    let text = fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text)?;
    let obj = v.as_object().context("sidecar is not a JSON object")?;
    let mut keys: Vec<&str> = obj.keys().map(String::as_str).collect();
    keys.sort();
    ensure!(
        keys == ["hashoffset", "roothash"],
        "sidecar fields {keys:?}"
    );
    let root = obj["roothash"].as_str().context("roothash")?.to_string();
    ensure!(
        root.len() == 64 && root.bytes().all(|c| c.is_ascii_hexdigit()),
        "roothash {root:?}"
    );
    let off = obj["hashoffset"].as_u64().context("hashoffset")?;
    Ok((root, off))
}

fn veritysetup_verify(data: &Path, root: &str, off: u64) -> Result<std::process::Output> {
    Command::new("veritysetup")
        .arg("verify")
        .arg(data)
        .arg(data)
        .arg(root)
        .arg(format!("--hash-offset={off}"))
        .output()
        .context("running veritysetup (cryptsetup-bin)")
}

/// Everything about one formatted layer: sidecar, superblock, tree, veritysetup on it and on
/// a copy with a flipped byte. `block` is the expected data and hash block size.
fn check_formatted(env: &Env, id: u64, block: u64, what: &str) -> Result<()> {
    let layer = env.layer(id);
    let (root, off) = sidecar(env, id)?;
    let len = fs::metadata(&layer)?.len();
    ensure!(
        off % block == 0,
        "{what}: hashoffset {off} not a multiple of {block}"
    );
    ensure!(
        len > off,
        "{what}: no tree after the data ({len} bytes, hashoffset {off})"
    );
    // The data part is still a valid EROFS image.
    erofs_image::Image::open(fs::File::open(&layer)?)
        .with_context(|| format!("{what}: the data part is not an EROFS image"))?;
    // veritysetup's superblock.
    let f = fs::File::open(&layer)?;
    let mut sb = [0u8; 512];
    f.read_exact_at(&mut sb, off)?;
    let u32at = |o: usize| u32::from_le_bytes(sb[o..o + 4].try_into().unwrap());
    ensure!(
        &sb[0..8] == b"verity\0\0",
        "{what}: no verity superblock at {off}"
    );
    ensure!(u32at(8) == 1 && u32at(12) == 1, "{what}: version/hash type");
    ensure!(&sb[32..38] == b"sha256", "{what}: algorithm");
    ensure!(
        u32at(64) as u64 == block && u32at(68) as u64 == block,
        "{what}: block sizes {} / {}",
        u32at(64),
        u32at(68)
    );
    let data_blocks = u64::from_le_bytes(sb[72..80].try_into().unwrap());
    ensure!(
        data_blocks * block == off,
        "{what}: {data_blocks} data blocks"
    );
    ensure!(
        u16::from_le_bytes([sb[80], sb[81]]) == 32,
        "{what}: salt size"
    );
    let out = veritysetup_verify(&layer, &root, off)?;
    ensure!(
        out.status.success(),
        "{what}: veritysetup verify failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // A copy with one data byte flipped fails verification.
    let copy = env.work.join(format!("flipped-{id}"));
    fs::copy(&layer, &copy)?;
    flip_byte(&copy, off / 2)?;
    let out = veritysetup_verify(&copy, &root, off)?;
    ensure!(
        !out.status.success(),
        "{what}: veritysetup verify accepted a flipped data byte"
    );
    // So does a flipped byte in the tree itself.
    fs::copy(&layer, &copy)?;
    flip_byte(&copy, len - 1)?;
    let out = veritysetup_verify(&copy, &root, off)?;
    ensure!(
        !out.status.success(),
        "{what}: veritysetup verify accepted a flipped tree byte"
    );
    fs::remove_file(&copy)?;
    Ok(())
}

fn layer_tar(tag: &str) -> Result<Vec<u8>> {
    let mut l = testsuite::oci::LayerBuilder::new();
    l.dir("etc", 0o755)
        .file("etc/motd", 0o644, format!("{tag}\n").as_bytes())
        .file("data/big", 0o644, &vec![0x5au8; 300_000])
        .symlink("etc/link", "motd");
    for i in 0..50 {
        l.file(&format!("many/f{i}"), 0o644, format!("{i}").as_bytes());
    }
    l.finish()
}

/// A read-only view of `parent` shows `etc/motd` = `tag` (host mode: the layer is mounted
/// without dm-verity on this kernel).
async fn view_shows(env: &Env, key: &str, parent: &str, tag: &str) -> Result<()> {
    let mounts = env.c().view(key, parent).await?;
    let m = env.mount(&mounts, "view")?;
    let got = fs::read_to_string(m.path().join("etc/motd"))?;
    ensure!(got == format!("{tag}\n"), "{parent}: etc/motd is {got:?}");
    ensure!(fs::metadata(m.path().join("data/big"))?.len() == 300_000);
    m.unmount()?;
    env.c().remove(key).await?;
    Ok(())
}

const TAR_GZ: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const TAR: &str = "application/vnd.oci.image.layer.v1.tar";
const EROFS: &str = "application/vnd.erofs.layer.v1";

#[test]
fn dmverity_full_images() {
    run(
        Env::new(BIN, Cfg::new().df("enable_dmverity = true")),
        async |env| {
            ensure!(
                env.log_text()
                    .contains("dm-verity is not available in this kernel"),
                "no start-up note about dm-verity"
            );
            for (media, compress) in [(TAR_GZ, true), (TAR, false)] {
                let tar = layer_tar(media)?;
                let blob = if compress { gzip(&tar)? } else { tar.clone() };
                let desc = env.add_blob(media, &blob)?;
                let (id, applied) = env
                    .apply_layer(&format!("dm/{media}/a"), &format!("dm/{media}"), &desc)
                    .await?;
                ensure!(
                    applied.digest == testsuite::oci::sha256_digest(&tar),
                    "applied digest {} is not the diffID",
                    applied.digest
                );
                check_formatted(env, id, 4096, media)?;
                view_shows(env, &format!("dm/{media}/v"), &format!("dm/{media}"), media).await?;
            }
            Ok(())
        },
    );
}

#[test]
fn dmverity_tar_index() {
    run(
        Env::new(
            BIN,
            Cfg::new()
                .df("enable_dmverity = true")
                .df("enable_tar_index = true"),
        ),
        async |env| {
            for (media, compress) in [(TAR_GZ, true), (TAR, false)] {
                let tar = layer_tar(media)?;
                let blob = if compress { gzip(&tar)? } else { tar.clone() };
                let desc = env.add_blob(media, &blob)?;
                let (id, _) = env
                    .apply_layer(&format!("dmi/{media}/a"), &format!("dmi/{media}"), &desc)
                    .await?;
                // A tar index holds the tar itself after the index.
                let (_, off) = sidecar(env, id)?;
                ensure!(
                    off as usize > tar.len(),
                    "hashoffset {off} < tar size {}",
                    tar.len()
                );
                check_formatted(env, id, 512, &format!("tar index from {media}"))?;
                view_shows(
                    env,
                    &format!("dmi/{media}/v"),
                    &format!("dmi/{media}"),
                    media,
                )
                .await?;
            }
            Ok(())
        },
    );
}

#[test]
fn dmverity_native_erofs_layer() {
    run(
        Env::new(BIN, Cfg::new().df("enable_dmverity = true")),
        async |env| {
            let tar = layer_tar("native")?;
            let img = env.work.join("native.erofs");
            let out = fs::File::create(&img)?;
            erofs_image::tar_to_image(
                &mut &tar[..],
                &out,
                &erofs_image::BuildOptions {
                    oci_whiteouts: true,
                    ..Default::default()
                },
            )?;
            drop(out);
            let image = fs::read(&img)?;
            for zstd in [false, true] {
                let (media, blob) = if zstd {
                    (format!("{EROFS}+zstd"), zstd::encode_all(&image[..], 3)?)
                } else {
                    (EROFS.to_string(), image.clone())
                };
                let desc = env.add_blob(&media, &blob)?;
                let (id, applied) = env
                    .apply_layer(&format!("dmn/{media}/a"), &format!("dmn/{media}"), &desc)
                    .await?;
                ensure!(applied.media_type == EROFS, "{applied:?}");
                let (_, off) = sidecar(env, id)?;
                ensure!(
                    off == (image.len() as u64).next_multiple_of(4096),
                    "hashoffset {off} for a {}-byte native image",
                    image.len()
                );
                // The data part is the native image itself.
                let layer = fs::read(env.layer(id))?;
                ensure!(
                    layer[..image.len()] == image[..],
                    "the native image was altered"
                );
                check_formatted(env, id, 4096, &media)?;
                view_shows(
                    env,
                    &format!("dmn/{media}/v"),
                    &format!("dmn/{media}"),
                    "native",
                )
                .await?;
            }
            Ok(())
        },
    );
}

/// `dmverity_mode = "on"` on a kernel without dm-verity: the daemon refuses to start.
#[test]
fn dmverity_on_refuses_to_start() {
    let mut env = Env::new(
        BIN,
        Cfg::new()
            .sn("dmverity_mode = \"on\"")
            .df("enable_dmverity = true"),
    )
    .unwrap();
    let (st, log) = env.start_expecting_refusal().unwrap();
    assert!(!st.success(), "exit status {st}");
    assert!(
        log.contains("dmverity_mode = \"on\"") && log.contains("kernel has no dm-verity"),
        "unclear refusal:\n{log}"
    );
}

fn dmverity_option(m: &Mount) -> Option<&str> {
    m.options
        .iter()
        .find_map(|o| o.strip_prefix("X-containerd.dmverity="))
}

/// Manager mode: erofs mounts of a layer with a sidecar carry `X-containerd.dmverity=` naming
/// it; layers without one carry nothing; `dmverity_mode = "off"` drops the option.
#[test]
fn manager_mode_names_the_sidecar() {
    let manager = || {
        Cfg::new()
            .top("mount_mode = \"manager\"")
            .df("enable_dmverity = true")
    };
    run(Env::new(BIN, manager()), async |env| {
        let tar = layer_tar("manager")?;
        let desc: Descriptor = env.add_blob(TAR_GZ, &gzip(&tar)?)?;
        let (id, _) = env.apply_layer("mgr/a", "mgr/l", &desc).await?;
        check_formatted(env, id, 4096, "manager mode")?;
        let side = env.snapshot_dir(id).join("layer.erofs.dmverity");
        // A second layer from a directory (Commit conversion): no tree, no sidecar.
        // (Manager-mode mounts are for containerd's mount manager: write the upper dir
        // directly.)
        let b = env.c().prepare("mgr/b", "mgr/l").await?;
        let upper = testsuite::rootfs::parse_overlay(b.last().context("no mounts")?)?
            .upper
            .context("no upperdir")?;
        let top = env.id_of(&upper).context("upperdir outside the root")?;
        fs::create_dir_all(upper.join("etc"))?;
        fs::write(upper.join("etc/top"), b"top\n")?;
        env.c().commit("mgr/top", "mgr/b").await?;
        ensure!(!env.snapshot_dir(top).join("layer.erofs.dmverity").exists());

        let v = env.c().view("mgr/v", "mgr/l").await?;
        ensure!(v.len() == 1 && v[0].r#type == "erofs", "{v:?}");
        ensure!(
            dmverity_option(&v[0]) == Some(side.to_str().unwrap()),
            "view mounts {v:?}"
        );
        let p = env.c().prepare("mgr/p", "mgr/top").await?;
        let erofs: Vec<&Mount> = p.iter().filter(|m| m.r#type == "erofs").collect();
        ensure!(erofs.len() == 2, "{p:?}");
        for m in &erofs {
            let want =
                (m.source == env.layer(id).to_str().unwrap()).then_some(side.to_str().unwrap());
            ensure!(dmverity_option(m) == want, "{m:?}");
        }
        ensure!(p.last().unwrap().r#type == "format/mkdir/overlay", "{p:?}");

        env.stop()?;
        env.set_config(manager().sn("dmverity_mode = \"off\""))?;
        env.start().await?;
        let v = env.c().mounts("mgr/v").await?;
        ensure!(dmverity_option(&v[0]).is_none(), "dmverity_mode off: {v:?}");
        Ok(())
    });
}

/// The roothash a sidecar records is what veritysetup computes from scratch over the same
/// data (a tree we did not build).
#[test]
fn roothash_matches_veritysetup_format() {
    run(
        Env::new(BIN, Cfg::new().df("enable_dmverity = true")),
        async |env| {
            let tar = layer_tar("format")?;
            let desc = env.add_blob(TAR_GZ, &gzip(&tar)?)?;
            let (id, _) = env.apply_layer("fmt/a", "fmt/l", &desc).await?;
            let (root, off) = sidecar(env, id)?;
            let data = env.work.join("data");
            let hash = env.work.join("hash");
            let f = fs::File::create(&data)?;
            let layer = fs::read(env.layer(id))?;
            use std::io::Write;
            (&f).write_all(&layer[..off as usize])?;
            drop(f);
            let out = run_ok(
                Command::new("veritysetup")
                    .arg("format")
                    .arg(&data)
                    .arg(&hash)
                    .arg(format!("--salt={}", "00".repeat(32)))
                    .args([
                        "--hash=sha256",
                        "--data-block-size=4096",
                        "--hash-block-size=4096",
                    ]),
            )?;
            let theirs = out
                .lines()
                .find_map(|l| l.strip_prefix("Root hash:"))
                .map(|s| s.trim().to_string())
                .context("no root hash in veritysetup format output")?;
            ensure!(
                theirs == root,
                "veritysetup format: {theirs}, sidecar: {root}"
            );
            Ok(())
        },
    );
}

/// Manager mode, a parentless active snapshot the differ filled (upstream's shape A,
/// `[erofs layer.erofs]`): its own layer has a sidecar, so its erofs mount names it like
/// every other erofs mount of a layer with a sidecar.
#[test]
fn manager_mode_own_layer_names_the_sidecar() {
    run(
        Env::new(
            BIN,
            Cfg::new()
                .top("mount_mode = \"manager\"")
                .df("enable_dmverity = true"),
        ),
        async |env| {
            let tar = layer_tar("own")?;
            let desc = env.add_blob(TAR_GZ, &gzip(&tar)?)?;
            let mounts = env.c().prepare("own/a", "").await?;
            let id = env.id_of_mounts(&mounts)?;
            env.c().apply(&desc, &mounts).await?;
            let side = env.snapshot_dir(id).join("layer.erofs.dmverity");
            ensure!(side.exists(), "no sidecar after Apply");
            let m = env.c().mounts("own/a").await?;
            ensure!(m.len() == 1 && m[0].r#type == "erofs", "{m:?}");
            ensure!(
                dmverity_option(&m[0]) == Some(side.to_str().unwrap()),
                "Mounts of the filled active snapshot: {m:?} (no X-containerd.dmverity={})",
                side.display()
            );
            Ok(())
        },
    );
}

/// Applying twice to the same active snapshot: the sidecar describes the layer in place,
/// not the first one.
#[test]
fn reapply_replaces_the_sidecar() {
    run(
        Env::new(BIN, Cfg::new().df("enable_dmverity = true")),
        async |env| {
            let first = env.add_blob(TAR_GZ, &gzip(&layer_tar("first")?)?)?;
            let second = env.add_blob(TAR_GZ, &gzip(&layer_tar("second one")?)?)?;
            let mounts = env.c().prepare("re/a", "").await?;
            let id = env.id_of_mounts(&mounts)?;
            env.c().apply(&first, &mounts).await?;
            let (root1, _) = sidecar(env, id)?;
            env.c().apply(&second, &mounts).await?;
            let (root2, _) = sidecar(env, id)?;
            ensure!(root1 != root2, "the sidecar was not rewritten");
            env.c().commit("re/l", "re/a").await?;
            check_formatted(env, id, 4096, "re-applied")?;
            view_shows(env, "re/v", "re/l", "second one").await
        },
    );
}

/// The sidecar is only a copy for containerd: a layer's tree is what the store recorded when
/// the differ built it. A sidecar rewritten next to the layer (another root hash and offset,
/// what someone who can edit the layer would write with their own tree) is refused naming
/// the layer, in host mode and in manager mode; put back, it is used again. A deleted one is
/// fine in host mode (the record is enough) and refused in manager mode (containerd reads
/// it). (The daemon used to take the sidecar as it found it.)
#[test]
fn sidecars_must_match_the_recorded_tree() {
    run(
        Env::new(BIN, Cfg::new().df("enable_dmverity = true")),
        async |env| {
            let mut layers = Vec::new();
            for tag in ["forged", "deleted", "manager"] {
                let desc = env.add_blob(TAR_GZ, &gzip(&layer_tar(tag)?)?)?;
                let (id, _) = env
                    .apply_layer(&format!("anc/{tag}-a"), &format!("anc/{tag}"), &desc)
                    .await?;
                layers.push(env.snapshot_dir(id).join("layer.erofs.dmverity"));
            }
            let forged = serde_json::json!({"roothash": "ab".repeat(32), "hashoffset": 4096});
            let refused = |e: tonic::Status, layer: &str| -> Result<()> {
                ensure!(
                    e.code() == tonic::Code::FailedPrecondition
                        && e.message().contains(layer)
                        && e.message().contains("sidecar"),
                    "{e:?}"
                );
                Ok(())
            };
            // Host mode, rewritten.
            let original = fs::read(&layers[0])?;
            fs::write(&layers[0], forged.to_string())?;
            refused(
                env.c().view("anc/v1", "anc/forged").await.unwrap_err(),
                "anc/forged",
            )?;
            fs::write(&layers[0], &original)?;
            view_shows(env, "anc/v1", "anc/forged", "forged").await?;
            // Host mode, deleted: the record alone.
            fs::remove_file(&layers[1])?;
            view_shows(env, "anc/v2", "anc/deleted", "deleted").await?;

            // Manager mode checks at every Mounts (containerd mounts the layer itself).
            env.stop()?;
            env.set_config(
                Cfg::new()
                    .top("mount_mode = \"manager\"")
                    .df("enable_dmverity = true"),
            )?;
            env.start().await?;
            let v = env.c().view("anc/v3", "anc/manager").await?;
            ensure!(
                dmverity_option(&v[0]) == Some(layers[2].to_str().unwrap()),
                "{v:?}"
            );
            let original = fs::read(&layers[2])?;
            fs::write(&layers[2], forged.to_string())?;
            refused(env.c().mounts("anc/v3").await.unwrap_err(), "anc/manager")?;
            fs::remove_file(&layers[2])?;
            refused(env.c().mounts("anc/v3").await.unwrap_err(), "anc/manager")?;
            fs::write(&layers[2], &original)?;
            env.c().mounts("anc/v3").await?;
            Ok(())
        },
    );
}
