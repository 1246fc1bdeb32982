//! The differ's `mkfs_options`: mkfs.erofs options with the meaning they have for upstream's
//! differ, mapped onto our builder. Options we cannot honour are refused by name.

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

/// Parsed `mkfs_options`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MkfsOptions {
    /// `-bN`: block size of full images.
    pub block_size: Option<u32>,
    /// `-TN`: image timestamp.
    pub timestamp: Option<i64>,
    /// `--mkfs-time`: keep file mtimes when `-T` is given.
    pub mkfs_time: bool,
    /// `-U`: overrides the digest-derived UUID.
    pub uuid: Option<UuidChoice>,
    /// `-E[no]inline_data`.
    pub inline_data: Option<bool>,
}

fn value<'a>(
    opt: &'a str,
    flag: &str,
    it: &mut impl Iterator<Item = &'a String>,
) -> Result<&'a str, String> {
    match opt.strip_prefix(flag) {
        Some("") => it
            .next()
            .map(String::as_str)
            .ok_or_else(|| format!("option {flag} needs a value")),
        Some(v) => Ok(v.strip_prefix('=').unwrap_or(v)),
        None => unreachable!(),
    }
}

impl MkfsOptions {
    /// Parse upstream-style options (`["-T0", "--mkfs-time", "-b4096", "-Enoinline_data"]`).
    pub fn parse(opts: &[String]) -> Result<Self, String> {
        let mut out = MkfsOptions::default();
        let mut it = opts.iter();
        while let Some(o) = it.next() {
            let o = o.as_str();
            if o == "--mkfs-time" {
                out.mkfs_time = true;
            } else if o == "--aufs"
                || o == "--quiet"
                || o == "-q"
                || o == "--sort=none"
                || o == "--all-time"
            {
                // --aufs is always on for layers, output is always quiet, and data is always in
                // tar order.
            } else if o.starts_with("-T") {
                let v = value(o, "-T", &mut it)?;
                out.timestamp = Some(v.parse().map_err(|_| format!("invalid -T value {v:?}"))?);
            } else if o.starts_with("-b") {
                let v = value(o, "-b", &mut it)?;
                let bs: u32 = v.parse().map_err(|_| format!("invalid -b value {v:?}"))?;
                if !bs.is_power_of_two() || !(512..=4096).contains(&bs) {
                    return Err(format!(
                        "block size {bs} unsupported (512..=4096, a power of two)"
                    ));
                }
                out.block_size = Some(bs);
            } else if o.starts_with("-U") {
                let v = value(o, "-U", &mut it)?;
                out.uuid = Some(match v {
                    "clear" => UuidChoice::Clear,
                    "random" => UuidChoice::Random,
                    u => UuidChoice::Fixed(
                        *uuid::Uuid::parse_str(u)
                            .map_err(|_| format!("invalid -U value {u:?}"))?
                            .as_bytes(),
                    ),
                });
            } else if o.starts_with("-E") {
                for e in value(o, "-E", &mut it)?.split(',') {
                    match e {
                        "inline_data" => out.inline_data = Some(true),
                        "noinline_data" | "^inline_data" => out.inline_data = Some(false),
                        other => return Err(format!("unsupported extended option -E{other}")),
                    }
                }
            } else if o.starts_with("-z") || o.starts_with("-C") || o.starts_with("--compress") {
                return Err(format!(
                    "unsupported mkfs option {o}: compressed layers are not produced"
                ));
            } else {
                return Err(format!("unsupported mkfs option {o}"));
            }
        }
        Ok(out)
    }

    /// Builder options for a layer whose compressed digest is `digest`: the UUID is
    /// uuid5(URL namespace, "erofs:blobs/" + digest), as upstream's differ does, unless `-U`
    /// says otherwise. Data stays block-aligned (`-Enoinline_data`) unless asked otherwise.
    pub fn build_options(&self, digest: &str) -> BuildOptions {
        let uuid = match self.uuid {
            Some(UuidChoice::Fixed(u)) => u,
            Some(UuidChoice::Clear) => [0; 16],
            Some(UuidChoice::Random) => *uuid::Uuid::new_v4().as_bytes(),
            None => *uuid::Uuid::new_v5(
                &uuid::Uuid::NAMESPACE_URL,
                format!("erofs:blobs/{digest}").as_bytes(),
            )
            .as_bytes(),
        };
        BuildOptions {
            block_size: self.block_size.unwrap_or(4096),
            inline_data: self.inline_data.unwrap_or(false),
            uuid,
            timestamp: self.timestamp,
            all_time: self.timestamp.is_some() && !self.mkfs_time,
            oci_whiteouts: true,
            ..Default::default()
        }
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
            &["-T"],
            &["-Efoo"],
        ] {
            assert!(MkfsOptions::parse(&s(bad)).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn uuid_matches_upstream_rule() {
        let b = MkfsOptions::default().build_options("sha256:abc");
        let want = uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_URL, b"erofs:blobs/sha256:abc");
        assert_eq!(b.uuid, *want.as_bytes());
        assert_eq!(want.get_version_num(), 5);
    }
}
