//! The images the tests import, and what a container must see in them.

use anyhow::Result;
use testsuite::oci::{self, Compression, ImageSpec, LayerBuilder};

/// Top-level entries of the busybox base layer.
pub const BUSYBOX_ROOT: &[&str] = &[
    "bin", "dev", "etc", "proc", "root", "sys", "tmp", "usr", "var",
];

/// busybox plus a small top layer with `/etc/motd`.
pub fn busybox(name: &str) -> Result<ImageSpec> {
    let mut top = LayerBuilder::new();
    top.file("etc/motd", 0o644, b"hello from erofs\n");
    Ok(ImageSpec::new(name)
        .layer(oci::busybox_base_layer()?, Compression::Gzip)
        .layer(top.finish()?, Compression::Zstd))
}

/// busybox alone (one layer).
pub fn busybox_single(name: &str) -> Result<ImageSpec> {
    Ok(ImageSpec::new(name).layer(oci::busybox_base_layer()?, Compression::Gzip))
}

/// Five layers with deletions (whiteouts), opaque directories, files replaced by directories
/// and the reverse, a hard link and a symlink. See [`WHITEOUT_EXPECTED`].
pub fn whiteouts(name: &str) -> Result<ImageSpec> {
    let mut l1 = LayerBuilder::new();
    l1.dir("data", 0o755)
        .dir("data/a", 0o755)
        .file("data/a/1", 0o644, b"a1")
        .file("data/a/2", 0o644, b"a2")
        .file("data/a/3", 0o644, b"a3")
        .dir("data/b", 0o755)
        .file("data/b/x", 0o644, b"bx")
        .file("data/b/y", 0o644, b"by")
        .file("data/keep", 0o644, b"keep")
        .hardlink("data/hl", "data/keep")
        .symlink("data/link", "a/1")
        .dir("data/gone", 0o755)
        .file("data/gone/f1", 0o644, b"g1")
        .dir("data/gone/sub", 0o755)
        .file("data/gone/sub/f2", 0o644, b"g2")
        .dir("data/opq", 0o755)
        .file("data/opq/old1", 0o644, b"o1")
        .file("data/opq/old2", 0o644, b"o2")
        .dir("data/opq/sub", 0o755)
        .file("data/opq/sub/old3", 0o644, b"o3")
        .file("data/file2dir", 0o644, b"was a file")
        .dir("data/dir2file", 0o755)
        .file("data/dir2file/inner", 0o644, b"inner")
        .file("etc/motd", 0o644, b"v1");
    let mut l2 = LayerBuilder::new();
    l2.whiteout("data/a/2")
        .whiteout("data/gone")
        .dir("data/opq", 0o755)
        .opaque("data/opq")
        .file("data/opq/new1", 0o644, b"n1")
        .file("data/b/z", 0o644, b"bz")
        .file("etc/motd", 0o644, b"v2")
        .whiteout("etc/group");
    let mut l3 = LayerBuilder::new();
    l3.dir("data/gone", 0o755)
        .file("data/gone/again", 0o644, b"again")
        .whiteout("data/b/x")
        .dir("data/a", 0o755)
        .opaque("data/a")
        .file("data/a/4", 0o644, b"a4")
        .dir("data/file2dir", 0o755)
        .file("data/file2dir/in", 0o644, b"in")
        .file("data/dir2file", 0o644, b"now a file");
    let mut l4 = LayerBuilder::new();
    l4.whiteout("data/gone/again")
        .file("data/gone/last", 0o644, b"last")
        .whiteout("data/never-existed");
    Ok(ImageSpec::new(name)
        .layer(oci::busybox_base_layer()?, Compression::Gzip)
        .layer(l1.finish()?, Compression::Zstd)
        .layer(l2.finish()?, Compression::None)
        .layer(l3.finish()?, Compression::Gzip)
        .layer(l4.finish()?, Compression::Zstd))
}

/// Shell script printing the tree the container sees below `/data` and a few `/etc` facts.
pub const WHITEOUT_SCRIPT: &str = r#"cd /data && find . | sort | while read p; do
  if [ -L "$p" ]; then echo "$p l $(readlink "$p")";
  elif [ -d "$p" ]; then echo "$p d";
  else echo "$p f $(cat "$p") $(stat -c %h "$p")"; fi
done
echo "motd $(cat /etc/motd)"
[ -e /etc/group ] && echo "group present" || echo "group absent"
[ -e /etc/passwd ] && echo "passwd present" || echo "passwd absent"
"#;

/// What [`WHITEOUT_SCRIPT`] prints for [`whiteouts`].
pub const WHITEOUT_EXPECTED: &str = "\
. d
./a d
./a/4 f a4 1
./b d
./b/y f by 1
./b/z f bz 1
./dir2file f now a file 1
./file2dir d
./file2dir/in f in 1
./gone d
./gone/last f last 1
./hl f keep 2
./keep f keep 2
./link l a/1
./opq d
./opq/new1 f n1 1
motd v2
group absent
passwd present
";

/// An image of busybox plus `n` small layers: layer `i` (1-based) adds `/layers/fI` and
/// rewrites `/layers/count`; every fifth layer also deletes the previous layer's file.
pub fn deep(name: &str, n: usize) -> Result<ImageSpec> {
    let mut spec = ImageSpec::new(name).layer(oci::busybox_base_layer()?, Compression::Gzip);
    for i in 1..=n {
        let mut l = LayerBuilder::new();
        l.dir("layers", 0o755)
            .file(&format!("layers/f{i}"), 0o644, i.to_string().as_bytes())
            .file("layers/count", 0o644, i.to_string().as_bytes());
        if i % 5 == 0 {
            l.whiteout(&format!("layers/f{}", i - 1));
        }
        let c = [Compression::Gzip, Compression::None, Compression::Zstd][i % 3];
        spec = spec.layer(l.finish()?, c);
    }
    Ok(spec)
}

/// What `cd /layers && for f in $(ls | sort); do echo "$f $(cat $f)"; done` prints for
/// [`deep`]`(n)`.
pub fn deep_expected(n: usize) -> String {
    let mut names: Vec<String> = (1..=n)
        .filter(|i| (i + 1) % 5 != 0 || *i == n)
        .map(|i| format!("f{i}"))
        .collect();
    names.push("count".into());
    names.sort();
    names
        .iter()
        .map(|f| {
            let v = if f == "count" {
                n.to_string()
            } else {
                f[1..].to_string()
            };
            format!("{f} {v}\n")
        })
        .collect()
}

/// The script matching [`deep_expected`].
pub const DEEP_SCRIPT: &str =
    r#"cd /layers && for f in $(ls | sort); do echo "$f $(cat $f)"; done"#;
