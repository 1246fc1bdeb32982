//! Filters built to hurt: huge, deeply nested, catastrophic for backtracking
//! engines, and many thousands of generated ones. Each must be rejected as a
//! parse error (which `Snapshots::list` turns into `InvalidArgument`) or
//! parse and match, quickly, without a panic or a stack overflow.

use super::*;
use std::time::{Duration, Instant};

/// Generous bound for one hostile case; the real figures are milliseconds.
const FAST: Duration = Duration::from_secs(1);

/// Runs `f`, failing if it takes longer than [`FAST`].
fn fast<T>(what: &str, f: impl FnOnce() -> T) -> T {
    let start = Instant::now();
    let out = f();
    let took = start.elapsed();
    assert!(took < FAST, "{what}: took {took:?}");
    out
}

fn rejected(what: &str, filter: &str) -> FilterError {
    match fast(what, || parse(filter)) {
        Ok(_) => panic!("{what}: parsed"),
        Err(e) => e,
    }
}

#[test]
fn huge_filters_are_rejected_before_scanning() {
    let huge = format!("name=={}", "a".repeat(1 << 20));
    let e = rejected("1 MiB value", &huge);
    assert!(e.message().contains("longer than"), "{e}");
    // The error does not echo the whole input back.
    assert!(e.input().len() <= 64 && e.to_string().len() < 200, "{e}");

    let e = rejected(
        "1 MiB pattern",
        &format!("name~=\"{}\"", "(".repeat(1 << 20)),
    );
    assert!(e.message().contains("longer than"), "{e}");

    let e = rejected("multibyte", &"牛".repeat(MAX_FILTER_LEN));
    assert!(e.input().is_char_boundary(e.input().len()));

    // Just under the limit is fine: a long label value compares as usual.
    let value = "v".repeat(MAX_FILTER_LEN - "labels.x==".len());
    let f = fast("longest filter", || parse(&format!("labels.x=={value}"))).unwrap();
    assert!(f.matches(&|_: &[String]| Some(value.clone())));
}

#[test]
fn too_many_terms_are_rejected() {
    let many = vec!["a"; MAX_SELECTORS + 1].join(",");
    let e = rejected("selectors", &many);
    assert!(e.message().contains("selectors"), "{e}");
    assert!(parse(&vec!["a"; MAX_SELECTORS].join(",")).is_ok());

    let filters = vec!["name==x"; MAX_FILTERS + 1];
    let e = fast("filters", || parse_all(&filters)).unwrap_err();
    assert!(e.message().contains("filters"), "{e}");
    assert!(parse_all(&filters[1..]).is_ok());

    let regexes = vec!["a~=x"; MAX_REGEXES + 1];
    let e = rejected("regexes in one filter", &regexes.join(","));
    assert!(e.message().contains("regular expressions"), "{e}");
    let e = fast("regexes in a request", || parse_all(&regexes)).unwrap_err();
    assert!(e.message().contains("regular expressions"), "{e}");
    assert!(parse_all(&regexes[1..]).is_ok());
}

#[test]
fn deep_nesting_is_rejected_without_recursion() {
    for depth in [101, 500, 10_000, 1 << 20] {
        let pattern = format!("{}a{}", "(".repeat(depth), ")".repeat(depth));
        let e = fast("nested groups", || regexp::Regex::new(&pattern)).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("nests too deeply") || msg.contains("longer than"),
            "{depth}: {msg}"
        );
        let e = rejected("nested groups in a filter", &format!("name~=/{pattern}/"));
        assert!(
            e.message().starts_with("invalid regular expression: ")
                || e.message().contains("longer than"),
            "{e}"
        );
    }
    // Unclosed groups and classes nested as deep as the length allows.
    for pattern in [
        "(".repeat(1024),
        "[".repeat(1024),
        "(?:".repeat(341),
        "(?i:".repeat(256),
    ] {
        assert!(fast("unclosed", || regexp::Regex::new(&pattern)).is_err());
    }
    // Exactly at the limit compiles and matches.
    let ok = format!("{}a{}", "(".repeat(MAX_DEPTH), ")".repeat(MAX_DEPTH));
    assert!(
        fast("100 groups", || regexp::Regex::new(&ok))
            .unwrap()
            .is_match("a")
    );
    // Repetitions of groups of repetitions, as deep as allowed.
    let stars = format!("{}a{}", "(".repeat(MAX_DEPTH), ")*".repeat(MAX_DEPTH));
    assert!(
        fast("starred groups", || regexp::Regex::new(&stars))
            .unwrap()
            .is_match("")
    );
    // Stacked repetitions, which Go allows through `\Q\E` and flags.
    for sep in [r"\Q\E", "(?i)", "(?)"] {
        let stacked = format!("a{}", format!("*{sep}").repeat(1000 / (sep.len() + 1)));
        if let Ok(re) = fast("stacked", || regexp::Regex::new(&stacked)) {
            assert!(fast("stacked match", || re.is_match(&"a".repeat(10_000))));
        }
    }
    // A field path has no nesting, but can be long.
    let path = format!("labels.{}x==y", "a.".repeat(10_000));
    let f = fast("long path", || parse(&path)).unwrap();
    assert_eq!(f.selectors()[0].fieldpath().len(), 10_002);
}

const MAX_DEPTH: usize = regexp::MAX_NESTING;

#[test]
fn catastrophic_patterns_match_in_linear_time() {
    let a = "a".repeat(100_000);
    let x = "x".repeat(100_000);
    let cases: &[(&str, &str, bool)] = &[
        ("(a*)*b", &a, false),
        ("(a|a)*b", &a, false),
        ("(a+a+)+b", &a, false),
        ("(x+x+)+y", &x, false),
        ("^(a|aa)*c$", &a, false),
        ("(a|b)*a{20}$", &a, true),
        ("(?:a?){1000}a{1000}", &a[..1000], true),
        (r"^(\w+\s?)+$", &format!("{a}!"), false),
        ("(.*){10}b", &a, false),
        ("(?i)(A|a|\u{212A}|k)*z", &a, false),
        ("x{100}", &a, false),
        ("((a{10}){10}){10}", &a, true),
    ];
    for &(pattern, text, want) in cases {
        let re = fast(pattern, || regexp::Regex::new(pattern))
            .unwrap_or_else(|e| panic!("{pattern:?}: {e}"));
        assert_eq!(fast(pattern, || re.is_match(text)), want, "{pattern:?}");
        // And through a filter, on a field of that size.
        let quoted = pattern.replace('\\', r"\\").replace('"', "\\\"");
        let f = parse(&format!("name~=\"{quoted}\"")).unwrap();
        assert_eq!(
            fast(pattern, || f.matches(&|_: &[String]| Some(text.to_owned()))),
            want
        );
    }
}

#[test]
fn oversized_programs_are_rejected_fast() {
    for pattern in [
        "(a{1000}){1000}",
        "((((a{100}){100}){100}){100})",
        r"(\pL{1000}){1000}",
        "(?i)((((\u{212A}{100}){100}){100}){100})",
        "[^a]{1000}[^b]{1000}[^c]{1000}[^d]{1000}",
    ] {
        let e = fast(pattern, || regexp::Regex::new(pattern));
        assert!(e.is_err(), "{pattern:?} compiled");
    }
}

/// A small deterministic generator (xorshift64*), so failures replay.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len())]
    }

    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }
}

/// Pieces of field names and values: ordinary, quoted, Unicode, control
/// characters, and the scanner's special characters.
const WORDS: &[&str] = &[
    "name",
    "parent",
    "kind",
    "labels",
    "a",
    "x-y_z",
    "0",
    "containerd",
    "io",
    "牛",
    "\u{212A}",
    "é",
    "\u{200B}",
    "\u{FEFF}",
    "\0",
    " ",
    "\t",
    "\n",
    ".",
    ",",
    "=",
    "!",
    "~",
    "/",
    "|",
    "\"",
    "\\",
    "'",
    "?",
    "*",
    "\u{10FFFF}",
    "\u{E000}",
];

const OPERATORS: &[&str] = &["==", "!=", "~=", "=", "===", "~", "!", "=~", "<", ""];

/// Pieces of regular expressions, Go's and the crate's, valid and not.
const REGEX_ATOMS: &[&str] = &[
    "a",
    "b",
    "牛",
    ".",
    "^",
    "$",
    r"\d",
    r"\D",
    r"\s",
    r"\w",
    r"\W",
    r"\b",
    r"\B",
    r"\A",
    r"\z",
    r"\pL",
    r"\p{Greek}",
    r"\PN",
    r"\p{^Han}",
    r"\p{Nope}",
    r"\C",
    r"\Q*+\E",
    r"\Q",
    r"\E",
    r"\x41",
    r"\x{1F600}",
    r"\x{D800}",
    r"\101",
    r"\0",
    r"\1",
    r"\8",
    r"\<",
    r"\>",
    r"\ ",
    r"\/",
    r"\e",
    r"\u0041",
    "[a-z]",
    "[^a]",
    "[]a]",
    "[[:alpha:]]",
    "[[:^space:]x]",
    "[[:nope:]]",
    "[a&&b]",
    "[a--b]",
    "[[x]",
    "[z-a]",
    r"[\d-z]",
    r"[a-\d]",
    "[",
    "]",
    "{",
    "}",
    "{,2}",
    "(?i)",
    "(?-i)",
    "(?ii)",
    "(?i-i)",
    "(?)",
    "(?x)",
    "(?u)",
    "(?s:",
    "(?U)",
    "(?P<n>",
    "(?<n>",
    "(?<1>",
    "(?P=n)",
    "(?=",
    "(?#",
    "(",
    ")",
    "|",
    "*",
    "+",
    "?",
    "*?",
    "+?",
    "??",
    "{2}",
    "{1000}",
    "{1001}",
    "{2,}",
    "{0,1000}",
    "{3,2}",
    "{99999999999}",
];

/// Valid Go atoms and quantifiers, for expressions that compile.
const VALID_ATOMS: &[&str] = &[
    "a",
    "b",
    "牛",
    ".",
    "^",
    "$",
    r"\d",
    r"\W",
    r"\s",
    r"\b",
    r"\pL",
    r"\P{Greek}",
    r"\Qa*\E",
    r"\x{212A}",
    r"\101",
    "[a-z]",
    "[^a]",
    "[]a]",
    "[[:alpha:]]",
    "[[x]",
    "[a&&b]",
    "{,2}",
    "(?i)",
    "(?-i)",
    "(?ii)",
    "(?)",
    r"\<",
    r"\ ",
];
const QUANTIFIERS: &[&str] = &[
    "", "", "", "*", "+", "?", "*?", "{2}", "{0,1000}", "{3,}", "{1000}",
];

/// An expression that is valid Go, with groups nested at and past the
/// limit and counts that may multiply past the size limit.
fn gen_valid_regex(rng: &mut Rng) -> String {
    let mut out = String::new();
    let mut open = 0;
    for _ in 0..rng.below(60) {
        match rng.below(10) {
            0 if open < MAX_DEPTH + 2 => {
                out.push_str(rng.pick(&["(", "(?:", "(?i:", "(?P<n>", "(?<m>"]));
                open += 1;
            }
            1 if open > 0 => {
                out.push(')');
                out.push_str(rng.pick(QUANTIFIERS));
                open -= 1;
            }
            2 => out.push('|'),
            _ => {
                out.push_str(rng.pick(VALID_ATOMS));
                out.push_str(rng.pick(QUANTIFIERS));
            }
        }
    }
    out.push_str(&")".repeat(open));
    out
}

fn gen_regex(rng: &mut Rng) -> String {
    if rng.chance(50) {
        return gen_valid_regex(rng);
    }
    let mut out = String::new();
    let len = match rng.below(10) {
        0 => 200 + rng.below(400),
        1..=3 => 10 + rng.below(40),
        _ => rng.below(10),
    };
    for _ in 0..len {
        match rng.below(20) {
            // Nesting at and past the group limit.
            0 => {
                let depth = [MAX_DEPTH - 1, MAX_DEPTH, MAX_DEPTH + 1, 3][rng.below(4)];
                let body = rng.pick(&["a", "a*", "(a*)*", ""]);
                let close = rng.pick(&[")", ")*", ")+", "){2}", "|)"]);
                out.push_str(&format!(
                    "{}{body}{}",
                    "(".repeat(depth),
                    close.repeat(depth)
                ));
            }
            1 => out.push_str(rng.pick(WORDS)),
            _ => out.push_str(rng.pick(REGEX_ATOMS)),
        }
    }
    out
}

fn gen_value(rng: &mut Rng, regex: bool) -> String {
    let raw = if regex {
        gen_regex(rng)
    } else {
        (0..rng.below(6)).map(|_| rng.pick(WORDS)).collect()
    };
    match rng.below(5) {
        0 => raw,
        1 => format!("\"{}\"", raw.replace('\\', r"\\").replace('"', "\\\"")),
        2 => format!("/{}/", raw.replace('\\', r"\\").replace('/', r"\/")),
        3 => format!("|{}|", raw.replace('\\', r"\\").replace('|', r"\|")),
        // Quoted with whatever escapes the raw text happens to contain.
        _ => format!("\"{raw}\""),
    }
}

/// A filter that is valid apart from what its expressions' sizes may make
/// of it, so that many of them reach the regular expression engine.
fn gen_clean_filter(rng: &mut Rng) -> String {
    let selectors: Vec<String> = (0..1 + rng.below(3))
        .map(|_| {
            let field = rng.pick(&["name", "kind", "labels.a", r#"labels."x.y/z""#]);
            match rng.below(3) {
                0 => format!("{field}==v"),
                1 => format!("{field}!=\"\""),
                _ => {
                    let re = gen_valid_regex(rng)
                        .replace('\\', r"\\")
                        .replace('"', "\\\"");
                    format!("{field}~=\"{re}\"")
                }
            }
        })
        .collect();
    selectors.join(",")
}

fn gen_filter(rng: &mut Rng) -> String {
    if rng.chance(40) {
        return gen_clean_filter(rng);
    }
    let mut out = String::new();
    let selectors = if rng.chance(2) {
        MAX_SELECTORS + rng.below(3) - 1
    } else {
        rng.below(5)
    };
    for i in 0..selectors {
        if i > 0 {
            out.push_str(rng.pick(&[",", ",", ",", ", ", ",,", " ,", "."]));
        }
        let fields = 1 + rng.below(3);
        for j in 0..fields {
            if j > 0 {
                out.push('.');
            }
            match rng.below(4) {
                0 => out.push_str(&format!("\"{}\"", rng.pick(WORDS))),
                1 => out.push_str(rng.pick(WORDS)),
                _ => out.push_str(rng.pick(&["name", "labels", "kind", "parent", "a"])),
            }
        }
        let op = rng.pick(OPERATORS);
        if rng.chance(10) {
            out.push(' ');
        }
        out.push_str(op);
        if !op.is_empty() {
            let regex = op.contains('~') || rng.chance(10);
            out.push_str(&gen_value(rng, regex));
        }
    }
    if rng.chance(1) {
        out.push_str(&"x".repeat(MAX_FILTER_LEN));
    }
    out
}

#[test]
fn generated_filters_never_panic_and_stay_fast() {
    let mut rng = Rng(0x5eed_f117_e125);
    let start = Instant::now();
    let (mut parsed, mut regexes) = (0, 0);
    let mut slowest = Duration::ZERO;
    const ROUNDS: usize = 10_000;
    for round in 0..ROUNDS {
        let filters: Vec<String> = (0..rng.below(4)).map(|_| gen_filter(&mut rng)).collect();
        let t = Instant::now();
        match parse_all(&filters) {
            Ok(set) => {
                parsed += 1;
                regexes += set
                    .filters()
                    .iter()
                    .flat_map(Filter::selectors)
                    .filter(|s| s.operator() == Operator::Matches)
                    .count();
                // Matching never fails; exercise it on a few shapes of value.
                for value in [
                    "",
                    "a",
                    "name",
                    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaab",
                    "牛\u{212A}",
                ] {
                    let _ = set.matches(&|_: &[String]| Some(value.to_owned()));
                }
                let _ = set.matches(&|_: &[String]| None);
            }
            Err(e) => {
                assert!(e.position() <= e.input().len(), "round {round}: {e:?}");
                assert!(
                    filters.iter().any(|f| f.starts_with(e.input())),
                    "round {round}"
                );
                let _ = e.to_string();
            }
        }
        // The fuzz target's entry point, on the same input.
        fuzz_filters(filters.join("\n").as_bytes());
        let took = t.elapsed();
        slowest = slowest.max(took);
        assert!(took < FAST, "round {round}: {filters:?} took {took:?}");
    }
    // The generator must reach both outcomes, and compile expressions.
    assert!(
        parsed > ROUNDS / 10 && parsed < ROUNDS * 9 / 10,
        "{parsed} parsed"
    );
    assert!(regexes > ROUNDS / 50, "{regexes} expressions compiled");
    assert!(
        start.elapsed() < Duration::from_secs(120),
        "{:?}",
        start.elapsed()
    );
    eprintln!("{parsed} of {ROUNDS} parsed, {regexes} expressions, slowest {slowest:?}");
}

#[test]
fn fuzz_entry_point_on_edge_inputs() {
    for data in [
        &b""[..],
        b"\n\n\n",
        b"\xff\xfe",
        b"name~=/(a*)*b/\nlabels.x~=|(x+x+)+y|",
        b"a~=\"\\xff\"",
    ] {
        fast("fuzz input", || fuzz_filters(data));
    }
    let many = "name~=a\n".repeat(MAX_FILTERS * 2);
    fast("many lines", || fuzz_filters(many.as_bytes()));
}
