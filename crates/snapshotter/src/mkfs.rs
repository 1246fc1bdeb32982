//! mkfs.erofs options, with the meaning upstream's mkfs.erofs gives them, mapped onto our
//! builder: the one parser of both the differ's `mkfs_options` (a list of strings, as
//! upstream's differ passes them to mkfs.erofs) and the `erofs-snapshotter mkfs` command
//! (whose argument parser hands each option over as a [`MkfsOption`]). Options we cannot
//! honour are refused by name.
//!
//! Where the rules are upstream's: `-E` takes a comma-separated list in which only a trailing
//! empty item is allowed; of `--all-time` and `--mkfs-time` the last one wins; `--sort` takes
//! `path` or `none`; `-U` takes a hyphenated UUID, `clear` or `random`. Where they are ours:
//! block sizes are powers of two from 512 to 4096 (the sizes our builder writes); `-T` is a
//! decimal number of seconds that fits an `i64` (upstream parses it with `strtoull`, wrapping
//! negative numbers into far-future times).

use erofs_image::BuildOptions;

/// A `-U` value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UuidChoice {
    /// A fixed UUID.
    Fixed([u8; 16]),
    /// All zeros (`-Uclear`).
    Clear,
    /// Random (`-Urandom`).
    Random,
}

/// One mkfs.erofs option with its value as given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MkfsOption<'a> {
    /// `-b BYTES`: block size of full images.
    BlockSize(&'a str),
    /// `-T SECONDS`: image timestamp (also every inode's mtime unless `--mkfs-time`).
    Timestamp(&'a str),
    /// `--all-time`: the timestamp applies to every inode (the default).
    AllTime,
    /// `--mkfs-time`: the timestamp is the build time only; files keep their mtimes.
    MkfsTime,
    /// `-U UUID|clear|random`.
    Uuid(&'a str),
    /// `-E OPTS`: extended options, comma-separated.
    Extended(&'a str),
    /// `--sort=path|none`: accepted; data is always in input order.
    Sort(&'a str),
    /// `--aufs`: OCI/AUFS whiteouts become overlayfs whiteouts.
    Aufs,
    /// `--quiet` (or `-q`).
    Quiet,
}

/// Why an option was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MkfsOptionError {
    /// An option that takes a value came last without one.
    #[error("option {0} needs a value")]
    MissingValue(String),
    /// `-T` is not a number of seconds.
    #[error("invalid -T value {0:?} (expected seconds since the epoch)")]
    Timestamp(String),
    /// `-b` is not a number.
    #[error("invalid -b value {0:?}")]
    BlockSize(String),
    /// `-b` is a size we do not write.
    #[error("block size {0} unsupported (512..=4096, a power of two)")]
    UnsupportedBlockSize(u32),
    /// `-U` is not a UUID, `clear` or `random`.
    #[error("invalid -U value {0:?} (expected a UUID, `clear` or `random`)")]
    Uuid(String),
    /// An `-E` item we do not know.
    #[error("unsupported extended option -E{0} (supported: inline_data, noinline_data)")]
    Extended(String),
    /// A `--sort` order we do not know.
    #[error("unsupported --sort={0} (supported: none, path)")]
    Sort(String),
    /// A compression option: we write uncompressed images only.
    #[error("unsupported mkfs option {0}: compressed layers are not produced")]
    Compression(String),
    /// Any other option.
    #[error("unsupported mkfs option {0}")]
    Unsupported(String),
}

/// Parsed mkfs.erofs options. Unset fields leave the caller's defaults, which differ: the
/// differ keeps data block-aligned and derives the UUID from the layer digest
/// ([`MkfsOptions::build_options`]), the mkfs command inlines data and picks a random UUID
/// as mkfs.erofs does ([`MkfsOptions::apply`] on [`BuildOptions::default`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MkfsOptions {
    /// `-bN`: block size of full images.
    pub block_size: Option<u32>,
    /// `-TN`: image timestamp.
    pub timestamp: Option<i64>,
    /// `--mkfs-time` (true) or `--all-time` (false), whichever came last.
    pub mkfs_time: bool,
    /// `-U`.
    pub uuid: Option<UuidChoice>,
    /// `-E[no]inline_data`.
    pub inline_data: Option<bool>,
    /// `--aufs`.
    pub aufs: bool,
    /// `--quiet`.
    pub quiet: bool,
}

fn parse_uuid(v: &str) -> Result<UuidChoice, MkfsOptionError> {
    let bad = || MkfsOptionError::Uuid(v.to_string());
    Ok(match v {
        "clear" => UuidChoice::Clear,
        "random" => UuidChoice::Random,
        // Upstream takes the hyphenated form only (not braces, URNs or bare hex).
        u if u.len() == 36 => {
            UuidChoice::Fixed(*uuid::Uuid::try_parse(u).map_err(|_| bad())?.as_bytes())
        }
        _ => return Err(bad()),
    })
}

impl MkfsOptions {
    /// Take one option into account (later options override earlier ones).
    pub fn set(&mut self, opt: MkfsOption<'_>) -> Result<(), MkfsOptionError> {
        match opt {
            MkfsOption::BlockSize(v) => {
                let bs: u32 = v
                    .parse()
                    .map_err(|_| MkfsOptionError::BlockSize(v.to_string()))?;
                if !bs.is_power_of_two() || !(512..=4096).contains(&bs) {
                    return Err(MkfsOptionError::UnsupportedBlockSize(bs));
                }
                self.block_size = Some(bs);
            }
            MkfsOption::Timestamp(v) => {
                // Digits only: `i64::from_str` would also take a sign.
                if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(MkfsOptionError::Timestamp(v.to_string()));
                }
                self.timestamp = Some(
                    v.parse()
                        .map_err(|_| MkfsOptionError::Timestamp(v.to_string()))?,
                );
            }
            MkfsOption::AllTime => self.mkfs_time = false,
            MkfsOption::MkfsTime => self.mkfs_time = true,
            MkfsOption::Uuid(v) => self.uuid = Some(parse_uuid(v)?),
            MkfsOption::Extended(v) => {
                // As upstream: a trailing comma ends the list ("a,b,"), any other empty item
                // ("," or ",a") is an unknown option.
                if v.is_empty() {
                    return Ok(());
                }
                let v = match v.strip_suffix(',') {
                    Some(head) if !head.is_empty() => head,
                    _ => v,
                };
                for e in v.split(',') {
                    match e {
                        "inline_data" => self.inline_data = Some(true),
                        "noinline_data" | "^inline_data" => self.inline_data = Some(false),
                        other => return Err(MkfsOptionError::Extended(other.to_string())),
                    }
                }
            }
            MkfsOption::Sort(v) => {
                if v != "none" && v != "path" {
                    return Err(MkfsOptionError::Sort(v.to_string()));
                }
            }
            MkfsOption::Aufs => self.aufs = true,
            MkfsOption::Quiet => self.quiet = true,
        }
        Ok(())
    }

    /// Parse upstream-style options (`["-T0", "--mkfs-time", "-b4096", "-Enoinline_data"]`);
    /// a short option's value may be attached (`-T0`), follow as the next item (`-T`, `0`) or
    /// follow a `=` (`-T=0`, as the mkfs command's argument parser also takes it).
    pub fn parse(opts: &[String]) -> Result<Self, MkfsOptionError> {
        let mut out = MkfsOptions::default();
        let mut it = opts.iter().map(String::as_str);
        while let Some(o) = it.next() {
            let opt = match o {
                "--mkfs-time" => MkfsOption::MkfsTime,
                "--all-time" => MkfsOption::AllTime,
                "--aufs" => MkfsOption::Aufs,
                "--quiet" | "-q" => MkfsOption::Quiet,
                _ if o.starts_with("--sort=") => MkfsOption::Sort(&o["--sort=".len()..]),
                _ if o.starts_with("-z") || o.starts_with("-C") || o.starts_with("--compress") => {
                    return Err(MkfsOptionError::Compression(o.to_string()));
                }
                _ if o.len() >= 2 && !o.starts_with("--") => {
                    let (flag, attached) = o.split_at(2);
                    if !matches!(flag, "-b" | "-T" | "-U" | "-E") {
                        return Err(MkfsOptionError::Unsupported(o.to_string()));
                    }
                    let value = match attached {
                        "" => it
                            .next()
                            .ok_or_else(|| MkfsOptionError::MissingValue(flag.to_string()))?,
                        v => v.strip_prefix('=').unwrap_or(v),
                    };
                    match flag {
                        "-b" => MkfsOption::BlockSize(value),
                        "-T" => MkfsOption::Timestamp(value),
                        "-U" => MkfsOption::Uuid(value),
                        _ => MkfsOption::Extended(value),
                    }
                }
                _ => return Err(MkfsOptionError::Unsupported(o.to_string())),
            };
            out.set(opt)?;
        }
        Ok(out)
    }

    /// Apply the options onto `opts` (the caller's defaults); `-Urandom` draws a UUID here.
    pub fn apply(&self, opts: &mut BuildOptions) {
        if let Some(bs) = self.block_size {
            opts.block_size = bs;
        }
        if let Some(t) = self.timestamp {
            opts.timestamp = Some(t);
        }
        opts.all_time = opts.timestamp.is_some() && !self.mkfs_time;
        match self.uuid {
            Some(UuidChoice::Fixed(u)) => opts.uuid = u,
            Some(UuidChoice::Clear) => opts.uuid = [0; 16],
            Some(UuidChoice::Random) => opts.uuid = *uuid::Uuid::new_v4().as_bytes(),
            None => {}
        }
        if let Some(inline) = self.inline_data {
            opts.inline_data = inline;
        }
        if self.aufs {
            opts.oci_whiteouts = true;
        }
    }

    /// Builder options for a layer whose compressed digest is `digest`: the UUID is
    /// uuid5(URL namespace, "erofs:blobs/" + digest), as upstream's differ does, unless `-U`
    /// says otherwise. Data stays block-aligned (`-Enoinline_data`) unless asked otherwise,
    /// and whiteouts are always translated (layers need it, `--aufs` or not).
    pub fn build_options(&self, digest: &str) -> BuildOptions {
        let mut opts = BuildOptions {
            block_size: 4096,
            inline_data: false,
            uuid: *uuid::Uuid::new_v5(
                &uuid::Uuid::NAMESPACE_URL,
                format!("erofs:blobs/{digest}").as_bytes(),
            )
            .as_bytes(),
            oci_whiteouts: true,
            ..BuildOptions::default()
        };
        self.apply(&mut opts);
        opts
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn upstream_options() {
        let o = MkfsOptions::parse(&s(&[
            "-T0",
            "--mkfs-time",
            "--sort=none",
            "-b4096",
            "-Enoinline_data",
            "-U",
            "clear",
        ]))
        .unwrap();
        assert_eq!(o.timestamp, Some(0));
        assert!(o.mkfs_time);
        assert_eq!(o.block_size, Some(4096));
        assert_eq!(o.inline_data, Some(false));
        assert_eq!(o.uuid, Some(UuidChoice::Clear));
        let b = o.build_options("sha256:x");
        assert!(!b.all_time && b.uuid == [0; 16]);
        for bad in [
            &["-zlz4"][..],
            &["--chunksize=4096"],
            &["-b3000"],
            &["-b8192"],
            &["-T"],
            &["-T-1"],
            &["-T5x"],
            &["-Efoo"],
            &["-E,"],
            &["-E,noinline_data"],
            &["--sort=random"],
            &["-U00112233445566778899aabbccddeeff"],
            &["-U{00112233-4455-6677-8899-aabbccddeeff}"],
            &["-x1"],
        ] {
            assert!(MkfsOptions::parse(&s(bad)).is_err(), "{bad:?}");
        }
    }

    /// Where the differ's and the command's rules used to differ, both now follow mkfs.erofs.
    #[test]
    fn rules_follow_mkfs_erofs() {
        // The last of --all-time / --mkfs-time wins.
        let o = MkfsOptions::parse(&s(&["-T5", "--mkfs-time", "--all-time"])).unwrap();
        assert!(o.build_options("d").all_time);
        let o = MkfsOptions::parse(&s(&["--all-time", "--mkfs-time", "-T5"])).unwrap();
        assert!(!o.build_options("d").all_time);
        // --sort=path is accepted, a trailing comma in -E too.
        let o = MkfsOptions::parse(&s(&["--sort=path", "-Enoinline_data,", "-E", ""])).unwrap();
        assert_eq!(o.inline_data, Some(false));
        // Values as separate items, or after '='.
        let o = MkfsOptions::parse(&s(&["-T", "7", "-b=1024", "-U", "random"])).unwrap();
        assert_eq!((o.timestamp, o.block_size), (Some(7), Some(1024)));
        let o = MkfsOptions::parse(&s(&["-U00112233-4455-6677-8899-AABBCCDDEEFF"])).unwrap();
        assert_eq!(
            o.uuid,
            Some(UuidChoice::Fixed([
                0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd,
                0xee, 0xff
            ]))
        );
    }

    #[test]
    fn apply_keeps_the_callers_defaults() {
        let mut b = BuildOptions::default();
        let before = b.clone();
        MkfsOptions::default().apply(&mut b);
        assert_eq!(b.inline_data, before.inline_data);
        assert_eq!(b.uuid, before.uuid);
        assert!(!b.oci_whiteouts && !b.all_time);
        let o = MkfsOptions::parse(&s(&["--aufs", "-T3", "-Einline_data"])).unwrap();
        let mut b = BuildOptions {
            inline_data: false,
            ..Default::default()
        };
        o.apply(&mut b);
        assert!(b.oci_whiteouts && b.inline_data && b.all_time);
        assert_eq!(b.timestamp, Some(3));
    }

    #[test]
    fn uuid_matches_upstream_rule() {
        let b = MkfsOptions::default().build_options("sha256:abc");
        let want = uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_URL, b"erofs:blobs/sha256:abc");
        assert_eq!(b.uuid, *want.as_bytes());
        assert_eq!(want.get_version_num(), 5);
    }
}
