//! A strict parser of the Prometheus text format (0.0.4), enough to check what the metrics
//! endpoint serves: every line a `# HELP`, a `# TYPE` or a sample; names and labels well
//! formed; every sample after its family's TYPE; histograms complete and consistent.

use std::collections::{BTreeMap, HashMap};

use anyhow::{Context, Result, bail, ensure};

/// One sample: name, labels, value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// A parsed scrape.
#[derive(Debug, Default)]
pub struct Scrape {
    pub samples: Vec<Sample>,
    /// Family name -> type.
    pub types: HashMap<String, String>,
}

impl Scrape {
    /// The value of the sample `name` whose labels include `labels` (exactly one must match).
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let m: Vec<&Sample> = self
            .samples
            .iter()
            .filter(|s| {
                s.name == name
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .collect();
        assert!(m.len() <= 1, "{name} {labels:?} matches {m:?}");
        m.first().map(|s| s.value)
    }

    /// [`get`](Self::get), 0 when absent (a counter not yet created).
    pub fn get0(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels).unwrap_or(0.0)
    }
}

fn valid_name(n: &str) -> bool {
    let mut c = n.chars();
    matches!(c.next(), Some(ch) if ch.is_ascii_alphabetic() || ch == '_' || ch == ':')
        && c.all(|ch| ch.is_ascii_alphanumeric() || ch == '_' || ch == ':')
}

fn valid_label(n: &str) -> bool {
    let mut c = n.chars();
    matches!(c.next(), Some(ch) if ch.is_ascii_alphabetic() || ch == '_')
        && c.all(|ch| ch.is_ascii_alphanumeric() || ch == '_')
}

fn parse_value(v: &str) -> Result<f64> {
    Ok(match v {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        _ => v.parse().with_context(|| format!("value {v:?}"))?,
    })
}

/// `{k="v",...}` at the start of `s`; returns the labels and the rest.
fn parse_labels(s: &str) -> Result<(BTreeMap<String, String>, &str)> {
    let mut labels = BTreeMap::new();
    let mut rest = s.strip_prefix('{').context("no {")?;
    loop {
        if let Some(r) = rest.strip_prefix('}') {
            return Ok((labels, r));
        }
        let eq = rest.find('=').context("label without =")?;
        let key = &rest[..eq];
        ensure!(valid_label(key), "label name {key:?}");
        rest = rest[eq + 1..]
            .strip_prefix('"')
            .context("label value not quoted")?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next() {
                Some((i, '"')) => break i,
                Some((_, '\\')) => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, '\\')) => value.push('\\'),
                    Some((_, '"')) => value.push('"'),
                    other => bail!("bad escape {other:?}"),
                },
                Some((_, '\n')) | None => bail!("unterminated label value"),
                Some((_, c)) => value.push(c),
            }
        };
        ensure!(
            labels.insert(key.to_string(), value).is_none(),
            "label {key} twice"
        );
        rest = &rest[end + 1..];
        rest = rest.strip_prefix(',').unwrap_or(rest);
    }
}

/// The family a sample belongs to (histogram samples carry suffixes).
fn family_of<'a>(name: &'a str, types: &HashMap<String, String>) -> Option<&'a str> {
    if types.contains_key(name) {
        return Some(name);
    }
    for suffix in ["_bucket", "_sum", "_count", "_total"] {
        if let Some(base) = name.strip_suffix(suffix)
            && types.contains_key(base)
        {
            return Some(base);
        }
    }
    None
}

/// Parse `text` strictly.
pub fn parse(text: &str) -> Result<Scrape> {
    ensure!(text.ends_with('\n'), "does not end with a newline");
    let mut s = Scrape::default();
    let mut helped = HashMap::new();
    for (n, line) in text.lines().enumerate() {
        let at = || format!("line {}: {line:?}", n + 1);
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            let (kw, name, arg) = (parts.next(), parts.next(), parts.next());
            let name = name.with_context(at)?;
            ensure!(valid_name(name), "{}: metric name", at());
            match kw {
                Some("HELP") => {
                    ensure!(
                        helped.insert(name.to_string(), ()).is_none(),
                        "{}: HELP twice",
                        at()
                    );
                    ensure!(arg.is_some_and(|a| !a.is_empty()), "{}: empty HELP", at());
                }
                Some("TYPE") => {
                    let t = arg.with_context(at)?;
                    ensure!(
                        matches!(t, "counter" | "gauge" | "histogram" | "summary" | "untyped"),
                        "{}: type",
                        at()
                    );
                    ensure!(
                        s.types.insert(name.to_string(), t.to_string()).is_none(),
                        "{}: TYPE twice",
                        at()
                    );
                }
                _ => bail!("{}: unknown comment", at()),
            }
            continue;
        }
        ensure!(
            !line.starts_with('#') && !line.trim().is_empty(),
            "{}",
            at()
        );
        let name_end = line.find(['{', ' ']).with_context(at)?;
        let name = &line[..name_end];
        ensure!(valid_name(name), "{}: metric name", at());
        let (labels, rest) = if line[name_end..].starts_with('{') {
            parse_labels(&line[name_end..]).with_context(at)?
        } else {
            (BTreeMap::new(), &line[name_end..])
        };
        let mut fields = rest.strip_prefix(' ').with_context(at)?.split(' ');
        let value = parse_value(fields.next().with_context(at)?).with_context(at)?;
        if let Some(ts) = fields.next() {
            ts.parse::<i64>().with_context(at)?;
        }
        ensure!(fields.next().is_none(), "{}: trailing fields", at());
        ensure!(
            family_of(name, &s.types).is_some(),
            "{}: sample before its TYPE",
            at()
        );
        s.samples.push(Sample {
            name: name.to_string(),
            labels,
            value,
        });
    }
    check_histograms(&s)?;
    Ok(s)
}

/// Each histogram series: buckets with `le`, non-decreasing, ending in `+Inf` equal to
/// `_count`, and a `_sum`.
fn check_histograms(s: &Scrape) -> Result<()> {
    for (fam, t) in &s.types {
        if t != "histogram" {
            continue;
        }
        let mut series: BTreeMap<BTreeMap<String, String>, Vec<(f64, f64)>> = BTreeMap::new();
        for b in s
            .samples
            .iter()
            .filter(|x| x.name == format!("{fam}_bucket"))
        {
            let mut l = b.labels.clone();
            let le = l.remove("le").context("bucket without le")?;
            series
                .entry(l)
                .or_default()
                .push((parse_value(&le)?, b.value));
        }
        for (labels, buckets) in series {
            let pairs: Vec<(&str, &str)> = labels
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            ensure!(
                buckets
                    .windows(2)
                    .all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1),
                "{fam} {labels:?}: buckets out of order or decreasing"
            );
            let last = buckets.last().context("no buckets")?;
            ensure!(last.0.is_infinite(), "{fam} {labels:?}: no +Inf bucket");
            let count = s
                .get(&format!("{fam}_count"), &pairs)
                .with_context(|| format!("{fam} {labels:?}: no _count"))?;
            ensure!(
                last.1 == count,
                "{fam} {labels:?}: +Inf {} != count {count}",
                last.1
            );
            s.get(&format!("{fam}_sum"), &pairs)
                .with_context(|| format!("{fam} {labels:?}: no _sum"))?;
        }
    }
    Ok(())
}

#[test]
fn the_parser_refuses_what_it_should() {
    let good = "# HELP a_total A.\n# TYPE a_total counter\na_total{x=\"1\"} 2\n";
    assert_eq!(
        parse(good).unwrap().get("a_total", &[("x", "1")]),
        Some(2.0)
    );
    for bad in [
        "a_total 1\n",                          // no TYPE
        "# TYPE a counter\na{x=1} 1\n",         // unquoted
        "# TYPE a counter\na{x=\"1\" 1\n",      // unterminated
        "# TYPE a counter\na 1 2 3\n",          // trailing
        "# TYPE a counter\na one\n",            // value
        "# TYPE a counter\n# TYPE a counter\n", // twice
        "# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\nh_count 1\nh_sum 0\n",
        "# TYPE h histogram\nh_bucket{le=\"+Inf\"} 2\nh_count 1\nh_sum 0\n",
        "# TYPE a counter\na 1", // no final newline
    ] {
        assert!(parse(bad).is_err(), "{bad:?}");
    }
}
