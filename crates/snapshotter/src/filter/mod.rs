//! containerd's filter expressions, as used by the snapshot `List` RPC
//! (`ListSnapshotsRequest.filters`).
//!
//! # Syntax
//!
//! A filter string is a comma separated list of *selectors*; an object
//! matches the filter when it matches every selector. The repeated
//! `filters` field of a request is a disjunction: an object is listed when
//! it matches any of the filter strings ([`parse_all`]). An empty filter
//! string, or no filter strings at all, matches everything.
//!
//! ```text
//! selectors := selector ("," selector)*
//! selector  := fieldpath [operator value]
//! fieldpath := field ("." field)*
//! field     := quoted | [A-Za-z0-9_-]+
//! operator  := "==" | "!=" | "~="
//! value     := quoted | <run of printable characters other than "," and white space>
//! quoted    := '"' ... '"'       (Go string syntax; "/.../" and "|...|" too, after "~=" only)
//! ```
//!
//! Examples: `name==foo`, `labels.foo`, `kind==active,labels."containerd.io/gc.root"`,
//! `parent!=""`, `name~=^sha256:[0-9a-f]+$`, `labels.x~=/a,b/`.
//!
//! A selector without an operator tests that the field is present. `==`
//! matches when the field is present and equal to the value. `!=` matches
//! when the field's value differs from the value, **an absent field counting
//! as the empty string** (so `parent!=""` selects snapshots with a parent and
//! `labels.x!=y` also selects objects without label `x`). `~=` matches when
//! the regular expression finds a match anywhere in the field's value (again
//! with an absent field read as `""`).
//!
//! An unquoted value runs to the next `,` or white space and cannot start
//! with `.`, `,`, `=`, `!`, `~`, `/`, `|` or `"` (containerd's scanner reads
//! those as other tokens), so `name~=.*` is a syntax error and must be
//! written `name~=/.*/`. White space is skipped before fields, operators
//! and values, but not after a value or after a field path that has no
//! operator (`name==a ,b` and `labels.x ` are errors, as in containerd).
//!
//! Quoted strings use Go's escapes (`\a \b \f \n \r \t \v \\ \xHH \ooo
//! \uHHHH \UHHHHHHHH`, and the escaped quote character). After `~=` the value
//! may also be delimited by `/` or `|`, which saves escaping in regular
//! expressions (`/a\/b/` is the expression `a/b`). Unquoted values are taken
//! verbatim, so `name~=[abc]\+` is the expression `[abc]\+`.
//!
//! # Regular expressions
//!
//! `~=` takes Go's RE2 syntax, as containerd does, matched by the `regex`
//! crate after a translation that keeps Go's meaning where the two dialects
//! differ (ASCII `\d \s \w \b`, `\Q...\E`, literal `[` in classes, literal
//! `{`, ...; the table is in `regexp.rs`). Matching takes time linear in
//! the length of the value.
//!
//! # Limits
//!
//! Filters come from clients, so they are bounded before anything is
//! compiled: a filter string is at most [`MAX_FILTER_LEN`] bytes and
//! [`MAX_SELECTORS`] selectors, a request at most [`MAX_FILTERS`] filters
//! and [`MAX_REGEXES`] `~=` selectors in all; an expression is at most 1024
//! bytes, nests groups at most 100 deep, repeats at most 1000 times, and
//! compiles to at most 256 KiB. Anything larger is a parse error
//! (`InvalidArgument`), never a panic, hang or stack overflow.
//!
//! # Differences from containerd
//!
//! * containerd compiles `~=` expressions lazily when matching and treats a
//!   bad expression as "matches nothing". Here it is a parse error, so the
//!   caller can report `InvalidArgument` rather than an empty listing.
//!   Expressions are compiled after the whole string has parsed, so any
//!   syntax error is still reported exactly as containerd reports it.
//! * containerd has none of the limits above.
//! * A NUL right after a value is reported as `unexpected null` where
//!   containerd prints `unexpected input: \u{FFFD}` (same position).
//! * Field names may contain `-`, as in current containerd (1.6 rejected it).
//! * Byte values that are not UTF-8 (from `\xHH` or octal escapes) are kept
//!   as bytes for `==`/`!=`; in a field path they are decoded lossily.
//! * "Printable" for unquoted values follows Go's `unicode.IsGraphic` except
//!   that unassigned code points count as printable.

use std::borrow::Cow;
use std::error::Error;
use std::fmt;
use std::str::FromStr;

#[cfg(test)]
mod hostile_tests;
mod parser;
mod regexp;
mod scanner;
#[cfg(test)]
mod tests;

use parser::Parser;

/// Longest accepted filter string, in bytes. containerd bounds label keys
/// and values to 4 KiB together, so real filters are far shorter, even with
/// every byte written as an escape.
pub const MAX_FILTER_LEN: usize = 64 * 1024;
/// Most selectors in one filter string.
pub const MAX_SELECTORS: usize = 128;
/// Most filter strings in one request ([`parse_all`]).
pub const MAX_FILTERS: usize = 128;
/// Most `~=` selectors in one filter string or request: each compiled
/// expression may take up to about 1 MiB (program and DFA cache).
pub const MAX_REGEXES: usize = 16;

/// Gives a filter access to the fields of the object being matched.
///
/// The mapping of field paths to values is up to the implementation; for
/// snapshots containerd uses `name`, `parent`, `kind` (`active`, `view` or
/// `committed`) and `labels.<key>`, where the key is the rest of the path
/// joined with `.` (so `labels.a.b` and `labels."a.b"` both name label `a.b`).
///
/// Closures `Fn(&[String]) -> Option<String>` are adaptors too.
pub trait Adaptor {
    /// Returns the value of the field at `path`, or `None` if the object has
    /// no such field.
    fn field(&self, path: &[String]) -> Option<String>;
}

impl<F> Adaptor for F
where
    F: Fn(&[String]) -> Option<String>,
{
    fn field(&self, path: &[String]) -> Option<String> {
        self(path)
    }
}

/// The comparison a [`Selector`] makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Operator {
    /// No operator: the field must be present.
    Present,
    /// `==`: the field must be present and equal to the value.
    Equal,
    /// `!=`: the field's value (`""` when absent) must differ from the value.
    NotEqual,
    /// `~=`: the regular expression must match somewhere in the field's value
    /// (`""` when absent).
    Matches,
}

impl Operator {
    /// The operator as written in a filter (`"?"` for [`Operator::Present`],
    /// as containerd prints it).
    pub fn as_str(self) -> &'static str {
        match self {
            Operator::Present => "?",
            Operator::Equal => "==",
            Operator::NotEqual => "!=",
            Operator::Matches => "~=",
        }
    }
}

impl fmt::Display for Operator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One `fieldpath[operator value]` term of a filter.
#[derive(Debug, Clone)]
pub struct Selector {
    fieldpath: Vec<String>,
    operator: Operator,
    value: Vec<u8>,
    /// Where the value starts in the filter string, for error reports.
    value_pos: usize,
    /// The compiled value, for [`Operator::Matches`].
    regex: Option<regexp::Regex>,
}

impl Selector {
    /// The field path, with quoting removed.
    pub fn fieldpath(&self) -> &[String] {
        &self.fieldpath
    }

    /// The operator.
    pub fn operator(&self) -> Operator {
        self.operator
    }

    /// The value with quoting removed (empty for [`Operator::Present`]).
    /// Bytes that are not UTF-8 are shown as U+FFFD.
    pub fn value(&self) -> Cow<'_, str> {
        String::from_utf8_lossy(&self.value)
    }

    /// Reports whether the object behind `adaptor` satisfies this selector.
    pub fn matches<A: Adaptor + ?Sized>(&self, adaptor: &A) -> bool {
        let field = adaptor.field(&self.fieldpath);
        match self.operator {
            Operator::Present => field.is_some(),
            Operator::Equal => field.is_some_and(|v| v.as_bytes() == self.value.as_slice()),
            Operator::NotEqual => {
                field.as_deref().unwrap_or("").as_bytes() != self.value.as_slice()
            }
            Operator::Matches => self
                .regex
                .as_ref()
                .is_some_and(|re| re.is_match(field.as_deref().unwrap_or(""))),
        }
    }
}

/// One parsed filter string: a conjunction of selectors.
///
/// A filter with no selectors (from the empty string) matches everything.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    selectors: Vec<Selector>,
}

impl Filter {
    /// A filter that matches everything.
    pub fn always() -> Self {
        Filter::default()
    }

    /// Reports whether this filter matches everything.
    pub fn is_always(&self) -> bool {
        self.selectors.is_empty()
    }

    /// The selectors, all of which must match.
    pub fn selectors(&self) -> &[Selector] {
        &self.selectors
    }

    /// Reports whether the object behind `adaptor` matches every selector.
    pub fn matches<A: Adaptor + ?Sized>(&self, adaptor: &A) -> bool {
        self.selectors.iter().all(|s| s.matches(adaptor))
    }
}

impl FromStr for Filter {
    type Err = FilterError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse(s)
    }
}

/// Several filters of which any one must match, as built by [`parse_all`]
/// from a request's repeated `filters` field.
///
/// An empty set matches everything.
#[derive(Debug, Clone, Default)]
pub struct FilterSet {
    filters: Vec<Filter>,
}

impl FilterSet {
    /// A set that matches everything.
    pub fn always() -> Self {
        FilterSet::default()
    }

    /// Reports whether this set matches everything.
    pub fn is_always(&self) -> bool {
        self.filters.is_empty() || self.filters.iter().any(Filter::is_always)
    }

    /// The filters, any of which may match.
    pub fn filters(&self) -> &[Filter] {
        &self.filters
    }

    /// Reports whether the object behind `adaptor` matches: true when the set
    /// is empty or any filter matches.
    pub fn matches<A: Adaptor + ?Sized>(&self, adaptor: &A) -> bool {
        self.filters.is_empty() || self.filters.iter().any(|f| f.matches(adaptor))
    }
}

/// A syntax error in a filter string (gRPC `InvalidArgument`).
///
/// Displays like containerd's message, e.g.
/// `filters: parse error: [name==foo >|,|< ,]: expected field or quoted`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilterError {
    input: String,
    position: usize,
    message: String,
}

impl FilterError {
    /// An error about the size of `input`, which is kept only in part: the
    /// whole would be echoed back to the client.
    fn too_long(input: &str) -> Self {
        const SHOWN: usize = 64;
        let mut end = input.len().min(SHOWN);
        while !input.is_char_boundary(end) {
            end -= 1;
        }
        FilterError {
            input: input[..end].to_owned(),
            position: end,
            message: format!("filter longer than {MAX_FILTER_LEN} bytes"),
        }
    }

    /// The filter string that failed to parse (its first 64 bytes when it
    /// was rejected for its size).
    pub fn input(&self) -> &str {
        &self.input
    }

    /// Byte offset in [`FilterError::input`] where the error was found
    /// (equal to the input's length for errors at its end).
    pub fn position(&self) -> usize {
        self.position
    }

    /// What was wrong, without the location.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for FilterError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("filters: parse error: ")?;
        let pos = self.position;
        if pos < self.input.len() && self.input.is_char_boundary(pos) {
            let (before, rest) = self.input.split_at(pos);
            let mut chars = rest.chars();
            let at = chars.next().unwrap_or_default();
            write!(
                f,
                "[{before} >|{at}|< {}]: {}",
                chars.as_str(),
                self.message
            )
        } else {
            write!(f, "[{}]: {}", self.input, self.message)
        }
    }
}

impl Error for FilterError {}

/// Parses one filter string. The empty string yields [`Filter::always`].
pub fn parse(s: &str) -> Result<Filter, FilterError> {
    parse_counting(s, &mut 0)
}

/// [`parse`], adding the filter's `~=` selectors to `regexes`, the count so
/// far in the request.
fn parse_counting(s: &str, regexes: &mut usize) -> Result<Filter, FilterError> {
    if s.is_empty() {
        return Ok(Filter::always());
    }
    if s.len() > MAX_FILTER_LEN {
        return Err(FilterError::too_long(s));
    }
    let mut parser = Parser::new(s);
    let mut selectors = parser.selectors()?;
    // Syntax errors anywhere take precedence over a bad expression, so that
    // every string containerd rejects is rejected with containerd's message.
    for selector in &mut selectors {
        if selector.operator == Operator::Matches {
            *regexes += 1;
            if *regexes > MAX_REGEXES {
                return Err(parser.error(
                    selector.value_pos,
                    format!("more than {MAX_REGEXES} regular expressions"),
                ));
            }
            let pattern = std::str::from_utf8(&selector.value).map_err(|_| {
                parser.error(
                    selector.value_pos,
                    "invalid regular expression: invalid UTF-8",
                )
            })?;
            let re = regexp::Regex::new(pattern).map_err(|e| {
                parser.error(
                    selector.value_pos,
                    format!("invalid regular expression: {e}"),
                )
            })?;
            selector.regex = Some(re);
        }
    }
    Ok(Filter { selectors })
}

/// Parses the repeated `filters` field of a request into a set that matches
/// when any filter matches; no filters at all match everything. The first
/// filter that fails to parse is reported.
pub fn parse_all<S: AsRef<str>>(filters: &[S]) -> Result<FilterSet, FilterError> {
    if let Some(extra) = filters.get(MAX_FILTERS) {
        let mut e = FilterError::too_long(extra.as_ref());
        e.message = format!("more than {MAX_FILTERS} filters");
        return Err(e);
    }
    let mut regexes = 0;
    let filters = filters
        .iter()
        .map(|s| parse_counting(s.as_ref(), &mut regexes))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(FilterSet { filters })
}

/// Parses arbitrary bytes as a request's filters, one per line, and matches
/// the result against a few objects, long values included: what the `filter`
/// fuzz target runs. Public only so that the target (outside the workspace)
/// stays a one-line call while this crate's tests cover the body.
#[doc(hidden)]
pub fn fuzz_filters(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let filters: Vec<&str> = text.split('\n').collect();
    match parse_all(&filters) {
        Ok(set) => {
            let long = "a".repeat(10_000);
            let values = [
                "",
                "sha256:0123abcd",
                "a-b_c.d/e",
                long.as_str(),
                "牛\u{212A}x\n",
            ];
            for value in values {
                let present = |_: &[String]| Some(value.to_owned());
                let labels_only =
                    |p: &[String]| (p.first()?.as_str() == "labels").then(|| value.to_owned());
                let _ = set.matches(&present);
                let _ = set.matches(&labels_only);
            }
            let _ = set.matches(&|_: &[String]| None);
        }
        Err(e) => {
            debug_assert!(e.position() <= e.input().len(), "{e:?}");
            let _ = e.to_string();
        }
    }
}
