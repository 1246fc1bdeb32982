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
//! `~=` uses a small, self-contained regular expression engine with Go's
//! RE2 syntax for the commonly used subset: literals and escapes, `.`,
//! classes (`[a-z]`, `[^...]`, `[[:alpha:]]`, `\d \s \w` and their negations),
//! `^ $ \A \z \b \B`, `\Q...\E`, groups (`(...)`, `(?:...)`, `(?P<name>...)`), flags
//! `(?i) (?m) (?s) (?U)`, alternation and the repetitions `* + ? {n} {n,}
//! {n,m}` (greedy or lazy). Matching is a Pike VM: time is linear in the
//! length of the value times the size of the compiled expression, so hostile
//! input cannot make it hang. Unicode classes (`\p{..}`), `\C` and
//! look-around are rejected, as are expressions longer than 1024 bytes.
//!
//! # Differences from containerd
//!
//! * containerd compiles `~=` expressions lazily when matching and treats a
//!   bad expression as "matches nothing". Here it is a parse error, so the
//!   caller can report `InvalidArgument` rather than an empty listing.
//!   Expressions are compiled after the whole string has parsed, so any
//!   syntax error is still reported exactly as containerd reports it.
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
    regex: Option<pikevm::Regex>,
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
    /// The filter string that failed to parse.
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
    if s.is_empty() {
        return Ok(Filter::always());
    }
    let mut parser = Parser {
        input: s,
        scanner: Scanner::new(s),
    };
    let mut selectors = parser.selectors()?;
    // Syntax errors anywhere take precedence over a bad expression, so that
    // every string containerd rejects is rejected with containerd's message.
    for selector in &mut selectors {
        if selector.operator == Operator::Matches {
            let pattern = std::str::from_utf8(&selector.value).map_err(|_| {
                parser.error(
                    selector.value_pos,
                    "invalid regular expression: invalid UTF-8",
                )
            })?;
            let re = pikevm::Regex::new(pattern).map_err(|e| {
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
    let filters = filters
        .iter()
        .map(|s| parse(s.as_ref()))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(FilterSet { filters })
}

// ---------------------------------------------------------------------------
// Scanner: splits a filter string into tokens, mirroring containerd's state
// machine (including where white space is and is not accepted).

/// A character read from the input, or one of the two conditions that stop
/// scanning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rune {
    Eof,
    Illegal,
    Char(char),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Token {
    Eof,
    Illegal,
    Quoted,
    Value,
    Field,
    Separator,
    Operator,
    /// A character that starts no token where it was found.
    Other,
}

#[derive(Debug)]
struct Scanner<'a> {
    input: &'a str,
    /// Start of the character last read.
    pos: usize,
    /// End of the character last read.
    ppos: usize,
    /// Whether the next bare word is a value (an operator was just read).
    value: bool,
    /// The first error met; later ones are not recorded.
    err: Option<&'static str>,
}

impl<'a> Scanner<'a> {
    fn new(input: &'a str) -> Self {
        Scanner {
            input,
            pos: 0,
            ppos: 0,
            value: false,
            err: None,
        }
    }

    fn next(&mut self) -> Rune {
        // Checking `pos` (not `ppos`) leaves `pos` at the end of the input
        // once the end is reached, which is where the EOF token sits.
        if self.pos >= self.input.len() {
            return Rune::Eof;
        }
        self.pos = self.ppos;
        let Some(c) = self.input[self.ppos..].chars().next() else {
            return Rune::Eof;
        };
        self.ppos += c.len_utf8();
        if c == '\0' {
            self.error("unexpected null");
            return Rune::Illegal;
        }
        Rune::Char(c)
    }

    fn peek(&mut self) -> Rune {
        let (pos, ppos) = (self.pos, self.ppos);
        let rune = self.next();
        self.pos = pos;
        self.ppos = ppos;
        rune
    }

    fn error(&mut self, msg: &'static str) {
        if self.err.is_none() {
            self.err = Some(msg);
        }
    }

    /// Returns the next token's position, kind and text.
    fn scan(&mut self) -> (usize, Token, &'a str) {
        let mut ch = self.next();
        let mut pos = self.pos;
        while let Rune::Char(c) = ch {
            if is_quote_char(c) {
                let ok = self.scan_quoted(c);
                let token = if ok { Token::Quoted } else { Token::Illegal };
                return (pos, token, &self.input[pos..self.ppos]);
            }
            if is_separator_char(c) {
                self.value = false;
                return (pos, Token::Separator, &self.input[pos..self.ppos]);
            }
            if is_operator_char(c) {
                self.scan_while(is_operator_char);
                self.value = true;
                return (pos, Token::Operator, &self.input[pos..self.ppos]);
            }
            if c.is_whitespace() {
                ch = self.next();
                pos = self.pos;
                continue;
            }
            if self.value {
                self.scan_while(is_value_char);
                self.value = false;
                return (pos, Token::Value, &self.input[pos..self.ppos]);
            }
            if is_field_char(c) {
                self.scan_while(is_field_char);
                return (pos, Token::Field, &self.input[pos..self.ppos]);
            }
            break;
        }
        let token = match ch {
            Rune::Eof => Token::Eof,
            Rune::Illegal => Token::Illegal,
            Rune::Char(_) => Token::Other,
        };
        (self.pos, token, "")
    }

    fn scan_while(&mut self, accept: fn(char) -> bool) {
        while let Rune::Char(c) = self.peek() {
            if !accept(c) {
                break;
            }
            self.next();
        }
    }

    /// Reads up to and including the closing `quote`; false if the literal
    /// is unterminated or has a bad escape.
    fn scan_quoted(&mut self, quote: char) -> bool {
        let mut legal = true;
        let mut ch = self.next();
        loop {
            match ch {
                Rune::Char(c) if c == quote => return legal,
                Rune::Char('\n') | Rune::Eof | Rune::Illegal => {
                    self.error("quoted literal not terminated");
                    return false;
                }
                Rune::Char('\\') => {
                    let (next, ok) = self.scan_escape(quote);
                    legal &= ok;
                    ch = next;
                }
                Rune::Char(_) => ch = self.next(),
            }
        }
    }

    /// Reads an escape after its backslash; returns the character after it.
    fn scan_escape(&mut self, quote: char) -> (Rune, bool) {
        let ch = self.next();
        match ch {
            Rune::Char(c) if c == quote || "abfnrtv\\".contains(c) => (self.next(), true),
            Rune::Char('0'..='7') => self.scan_digits(ch, 8, 3),
            Rune::Char('x') => {
                let first = self.next();
                self.scan_digits(first, 16, 2)
            }
            Rune::Char('u') => {
                let first = self.next();
                self.scan_digits(first, 16, 4)
            }
            Rune::Char('U') => {
                let first = self.next();
                self.scan_digits(first, 16, 8)
            }
            _ => {
                self.error("illegal escape sequence");
                (ch, false)
            }
        }
    }

    fn scan_digits(&mut self, mut ch: Rune, base: u32, mut n: u32) -> (Rune, bool) {
        while n > 0 && digit_value(ch) < base {
            ch = self.next();
            n -= 1;
        }
        if n > 0 {
            self.error("illegal numeric escape sequence");
            return (ch, false);
        }
        (ch, true)
    }
}

fn digit_value(rune: Rune) -> u32 {
    match rune {
        Rune::Char(c) => c.to_digit(16).unwrap_or(16),
        _ => 16,
    }
}

fn is_field_char(c: char) -> bool {
    c == '-' || c == '_' || c.is_ascii_alphanumeric()
}

fn is_operator_char(c: char) -> bool {
    matches!(c, '=' | '!' | '~')
}

fn is_quote_char(c: char) -> bool {
    matches!(c, '/' | '|' | '"')
}

fn is_separator_char(c: char) -> bool {
    matches!(c, ',' | '.')
}

/// Characters of an unquoted value: Go's `unicode.IsGraphic` minus `,` and
/// white space. Without Unicode tables, "graphic" is approximated as "not a
/// control, format, private-use or noncharacter code point".
fn is_value_char(c: char) -> bool {
    c != ','
        && !c.is_whitespace()
        && !c.is_control()
        && !is_format_char(c)
        && !is_private_or_nonchar(c)
}

/// Unicode general category Cf (format characters).
fn is_format_char(c: char) -> bool {
    matches!(
        c as u32,
        0x00AD
            | 0x0600..=0x0605
            | 0x061C
            | 0x06DD
            | 0x070F
            | 0x0890..=0x0891
            | 0x08E2
            | 0x180E
            | 0x200B..=0x200F
            | 0x202A..=0x202E
            | 0x2060..=0x2064
            | 0x2066..=0x206F
            | 0xFEFF
            | 0xFFF9..=0xFFFB
            | 0x110BD
            | 0x110CD
            | 0x13430..=0x1343F
            | 0x1BCA0..=0x1BCA3
            | 0x1D173..=0x1D17A
            | 0xE0001
            | 0xE0020..=0xE007F
    )
}

/// Private-use code points (Co) and noncharacters (part of Cn).
fn is_private_or_nonchar(c: char) -> bool {
    let u = c as u32;
    matches!(u, 0xE000..=0xF8FF | 0xF0000..=0x10FFFF | 0xFDD0..=0xFDEF) || (u & 0xFFFE) == 0xFFFE
}

// ---------------------------------------------------------------------------
// Parser.

#[derive(Debug)]
struct Parser<'a> {
    input: &'a str,
    scanner: Scanner<'a>,
}

impl Parser<'_> {
    fn error(&self, position: usize, message: impl Into<String>) -> FilterError {
        FilterError {
            input: self.input.to_owned(),
            position,
            message: message.into(),
        }
    }

    fn scanner_error(&self, position: usize) -> FilterError {
        self.error(position, self.scanner.err.unwrap_or("illegal input"))
    }

    fn selectors(&mut self) -> Result<Vec<Selector>, FilterError> {
        let mut selectors = vec![self.selector()?];
        loop {
            match self.scanner.peek() {
                Rune::Eof => return Ok(selectors),
                Rune::Char(',') => {
                    let (pos, token, _) = self.scanner.scan();
                    if token != Token::Separator {
                        return Err(self.error(pos, "expected a separator"));
                    }
                    selectors.push(self.selector()?);
                }
                Rune::Char(c) => {
                    return Err(self.error(self.scanner.ppos, format!("unexpected input: {c}")));
                }
                Rune::Illegal => {
                    let pos = self.scanner.ppos;
                    return Err(self.scanner_error(pos));
                }
            }
        }
    }

    fn selector(&mut self) -> Result<Selector, FilterError> {
        let fieldpath = self.fieldpath()?;
        if matches!(self.scanner.peek(), Rune::Char(',') | Rune::Eof) {
            return Ok(Selector {
                fieldpath,
                operator: Operator::Present,
                value: Vec::new(),
                value_pos: 0,
                regex: None,
            });
        }
        let operator = self.operator()?;
        let (value_pos, value) = self.value(operator == Operator::Matches)?;
        Ok(Selector {
            fieldpath,
            operator,
            value,
            value_pos,
            regex: None,
        })
    }

    fn fieldpath(&mut self) -> Result<Vec<String>, FilterError> {
        let mut fields = vec![self.field()?];
        while self.scanner.peek() == Rune::Char('.') {
            let (pos, token, _) = self.scanner.scan();
            if token != Token::Separator {
                return Err(self.error(pos, "expected a field separator (`.`)"));
            }
            fields.push(self.field()?);
        }
        Ok(fields)
    }

    fn field(&mut self) -> Result<String, FilterError> {
        let (pos, token, text) = self.scanner.scan();
        match token {
            Token::Field => Ok(text.to_owned()),
            Token::Quoted => {
                let bytes = self.unquote(pos, text, false)?;
                Ok(match String::from_utf8(bytes) {
                    Ok(s) => s,
                    Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
                })
            }
            Token::Illegal => Err(self.scanner_error(pos)),
            _ => Err(self.error(pos, "expected field or quoted")),
        }
    }

    fn operator(&mut self) -> Result<Operator, FilterError> {
        let (pos, token, text) = self.scanner.scan();
        match token {
            Token::Operator => match text {
                "==" => Ok(Operator::Equal),
                "!=" => Ok(Operator::NotEqual),
                "~=" => Ok(Operator::Matches),
                _ => Err(self.error(pos, format!("unsupported operator \"{text}\""))),
            },
            Token::Illegal => Err(self.scanner_error(pos)),
            _ => Err(self.error(pos, r#"expected an operator ("=="|"!="|"~=")"#)),
        }
    }

    fn value(&mut self, allow_alt_quotes: bool) -> Result<(usize, Vec<u8>), FilterError> {
        let (pos, token, text) = self.scanner.scan();
        match token {
            Token::Value | Token::Field => Ok((pos, text.as_bytes().to_vec())),
            Token::Quoted => Ok((pos, self.unquote(pos, text, allow_alt_quotes)?)),
            Token::Illegal => Err(self.scanner_error(pos)),
            _ => Err(self.error(pos, "expected value or quoted")),
        }
    }

    fn unquote(
        &self,
        pos: usize,
        text: &str,
        allow_alt_quotes: bool,
    ) -> Result<Vec<u8>, FilterError> {
        if !allow_alt_quotes && !text.starts_with('"') {
            return Err(self.error(pos, "invalid quote encountered"));
        }
        unquote(text).ok_or_else(|| self.error(pos, "unquoting failed: quote syntax error"))
    }
}

/// Decodes a quoted literal (delimiters included) with Go's string escapes,
/// where the delimiter is `"`, `/` or `|`. Returns bytes: `\xHH` and octal
/// escapes produce single bytes that need not form UTF-8.
fn unquote(text: &str) -> Option<Vec<u8>> {
    let bytes = text.as_bytes();
    let (&quote, rest) = bytes.split_first()?;
    let (&last, inner) = rest.split_last()?;
    if last != quote || !matches!(quote, b'"' | b'/' | b'|') || inner.contains(&b'\n') {
        return None;
    }
    let mut out = Vec::with_capacity(inner.len());
    let mut i = 0;
    while i < inner.len() {
        let b = inner[i];
        i += 1;
        if b == quote {
            return None;
        }
        if b != b'\\' {
            out.push(b);
            continue;
        }
        let e = *inner.get(i)?;
        i += 1;
        match e {
            b'a' => out.push(0x07),
            b'b' => out.push(0x08),
            b'f' => out.push(0x0C),
            b'n' => out.push(b'\n'),
            b'r' => out.push(b'\r'),
            b't' => out.push(b'\t'),
            b'v' => out.push(0x0B),
            b'\\' => out.push(b'\\'),
            b'x' | b'u' | b'U' => {
                let n = match e {
                    b'x' => 2,
                    b'u' => 4,
                    _ => 8,
                };
                let digits = inner.get(i..i + n)?;
                i += n;
                let mut v: u32 = 0;
                for &d in digits {
                    v = (v << 4) | char::from(d).to_digit(16)?;
                }
                if e == b'x' {
                    out.push(v as u8);
                } else {
                    if v > 0x10FFFF {
                        return None;
                    }
                    // Go encodes surrogate halves as U+FFFD.
                    let c = char::from_u32(v).unwrap_or('\u{FFFD}');
                    out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes());
                }
            }
            b'0'..=b'7' => {
                let digits = inner.get(i..i + 2)?;
                i += 2;
                let mut v = u32::from(e - b'0');
                for &d in digits {
                    if !(b'0'..=b'7').contains(&d) {
                        return None;
                    }
                    v = (v << 3) | u32::from(d - b'0');
                }
                out.push(u8::try_from(v).ok()?);
            }
            b'\'' | b'"' | b'|' | b'/' if e == quote => out.push(e),
            _ => return None,
        }
    }
    Some(out)
}

// ---------------------------------------------------------------------------
// Regular expressions for `~=`.

mod pikevm {
    //! A Pike-VM regular expression matcher for a subset of Go's RE2 syntax.
    //! Only "is there a match" is computed, so greediness and capture groups
    //! are parsed but have no effect.

    use std::fmt;

    /// Longest accepted pattern, in bytes.
    pub(super) const MAX_PATTERN_LEN: usize = 1024;
    /// Largest accepted compiled program, in instructions.
    const MAX_PROGRAM_LEN: usize = 10_000;
    /// Deepest accepted nesting of groups and repetitions.
    const MAX_NESTING: usize = 100;
    /// Largest count in `{n,m}`, as in Go.
    const MAX_REPEAT: u32 = 1000;

    /// Why a pattern was rejected.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub(super) struct RegexError(String);

    impl fmt::Display for RegexError {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(&self.0)
        }
    }

    fn err<T>(msg: impl Into<String>) -> Result<T, RegexError> {
        Err(RegexError(msg.into()))
    }

    /// A compiled regular expression.
    #[derive(Debug, Clone)]
    pub(super) struct Regex {
        prog: Vec<Inst>,
        classes: Vec<Class>,
    }

    #[derive(Debug, Clone, Copy)]
    enum Inst {
        Char(char),
        /// Matches any character whose simple case fold is this one.
        FoldChar(char),
        AnyChar,
        AnyNotNl,
        Class(usize),
        Assert(Look),
        Split(usize, usize),
        Jmp(usize),
        Match,
    }

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Look {
        TextStart,
        TextEnd,
        LineStart,
        LineEnd,
        WordBoundary,
        NotWordBoundary,
    }

    impl Look {
        fn holds(self, prev: Option<char>, next: Option<char>) -> bool {
            match self {
                Look::TextStart => prev.is_none(),
                Look::TextEnd => next.is_none(),
                Look::LineStart => prev.is_none_or(|c| c == '\n'),
                Look::LineEnd => next.is_none_or(|c| c == '\n'),
                Look::WordBoundary => is_word(prev) != is_word(next),
                Look::NotWordBoundary => is_word(prev) == is_word(next),
            }
        }
    }

    fn is_word(c: Option<char>) -> bool {
        c.is_some_and(|c| c == '_' || c.is_ascii_alphanumeric())
    }

    #[derive(Debug, Clone)]
    struct Class {
        ranges: Vec<(char, char)>,
        negated: bool,
        /// For case-insensitive classes: the sorted case folds of every
        /// member of the ranges small enough to enumerate...
        folded: Vec<char>,
        /// ...and the ranges too wide for that, or `None` when the class
        /// is case-sensitive.
        wide: Option<Vec<(char, char)>>,
    }

    /// Most members enumerated to build one case-insensitive class.
    const FOLD_BUDGET: u32 = 1 << 16;
    /// Widest range enumerated for a case-insensitive class.
    const FOLD_RANGE_MAX: u32 = 1 << 12;

    impl Class {
        fn new(ranges: Vec<(char, char)>, negated: bool, fold: bool) -> Self {
            let mut folded = Vec::new();
            let wide = fold.then(|| {
                let mut wide = Vec::new();
                let mut budget = FOLD_BUDGET;
                for &(lo, hi) in &ranges {
                    let size = hi as u32 - lo as u32 + 1;
                    if size <= FOLD_RANGE_MAX && size <= budget {
                        budget -= size;
                        folded.extend((lo..=hi).map(simple_fold));
                    } else {
                        wide.push((lo, hi));
                    }
                }
                folded.sort_unstable();
                folded.dedup();
                wide
            });
            Class {
                ranges,
                negated,
                folded,
                wide,
            }
        }

        fn contains(&self, c: char) -> bool {
            self.ranges.iter().any(|&(lo, hi)| (lo..=hi).contains(&c))
        }

        fn matches(&self, c: char) -> bool {
            let mut hit = self.contains(c);
            if let (false, Some(wide)) = (hit, &self.wide) {
                let f = simple_fold(c);
                hit = self.folded.binary_search(&f).is_ok()
                    || (!wide.is_empty()
                        && [Some(f), single_upper(f), single_upper(c), single_lower(c)]
                            .into_iter()
                            .flatten()
                            .chain(fold_extras(f).iter().copied())
                            .filter(|&v| simple_fold(v) == f)
                            .any(|v| wide.iter().any(|&(lo, hi)| (lo..=hi).contains(&v))));
            }
            hit != self.negated
        }
    }

    fn single(mut it: impl Iterator<Item = char>) -> Option<char> {
        let c = it.next()?;
        if it.next().is_some() { None } else { Some(c) }
    }

    fn single_upper(c: char) -> Option<char> {
        single(c.to_uppercase())
    }

    fn single_lower(c: char) -> Option<char> {
        single(c.to_lowercase())
    }

    /// A representative of `c`'s case-folding orbit (an approximation of
    /// Unicode simple case folding built from std's case mappings).
    fn simple_fold(c: char) -> char {
        if c.is_ascii() {
            return c.to_ascii_lowercase();
        }
        if c == '\u{131}' {
            // Dotless i folds to nothing else in Go.
            return c;
        }
        let upper = single_upper(c).unwrap_or(c);
        single_lower(upper).unwrap_or(upper)
    }

    /// Members of a folding orbit that upper/lower mappings do not reach from
    /// the representative.
    fn fold_extras(folded: char) -> &'static [char] {
        match folded {
            'k' => &['\u{212A}'],
            's' => &['\u{17F}'],
            '\u{E5}' => &['\u{212B}'],
            '\u{DF}' => &['\u{1E9E}'],
            '\u{3B2}' => &['\u{3D0}'],
            '\u{3B5}' => &['\u{3F5}'],
            '\u{3B8}' => &['\u{3D1}', '\u{3F4}'],
            '\u{3B9}' => &['\u{345}', '\u{1FBE}'],
            '\u{3BA}' => &['\u{3F0}'],
            '\u{3BC}' => &['\u{B5}'],
            '\u{3C0}' => &['\u{3D6}'],
            '\u{3C1}' => &['\u{3F1}'],
            '\u{3C3}' => &['\u{3C2}'],
            '\u{3C6}' => &['\u{3D5}'],
            '\u{3C9}' => &['\u{2126}'],
            '\u{1E61}' => &['\u{1E9B}'],
            '\u{1C6}' => &['\u{1C5}'],
            '\u{1C9}' => &['\u{1C8}'],
            '\u{1CC}' => &['\u{1CB}'],
            '\u{1F3}' => &['\u{1F2}'],
            _ => &[],
        }
    }

    #[derive(Debug)]
    enum Node {
        Empty,
        Char(char, bool),
        Any(bool),
        Class(usize),
        Look(Look),
        Concat(Vec<Node>),
        Alt(Vec<Node>),
        Repeat {
            sub: Box<Node>,
            min: u32,
            max: Option<u32>,
        },
    }

    #[derive(Debug, Clone, Copy, Default)]
    struct Flags {
        fold: bool,
        dot_nl: bool,
        multi_line: bool,
    }

    struct Parser {
        chars: Vec<char>,
        pos: usize,
        flags: Flags,
        depth: usize,
        classes: Vec<Class>,
    }

    impl Parser {
        fn peek(&self) -> Option<char> {
            self.chars.get(self.pos).copied()
        }

        fn peek_at(&self, k: usize) -> Option<char> {
            self.chars.get(self.pos + k).copied()
        }

        fn bump(&mut self) -> Option<char> {
            let c = self.peek()?;
            self.pos += 1;
            Some(c)
        }

        fn text(&self, start: usize, end: usize) -> String {
            self.chars[start..end.min(self.chars.len())]
                .iter()
                .collect()
        }

        fn rest(&self, start: usize) -> String {
            self.text(start, self.chars.len())
        }

        fn literal(&self, c: char) -> Node {
            Node::Char(c, self.flags.fold)
        }

        fn class(&mut self, ranges: Vec<(char, char)>, negated: bool) -> Node {
            self.classes
                .push(Class::new(ranges, negated, self.flags.fold));
            Node::Class(self.classes.len() - 1)
        }

        fn parse_alt(&mut self) -> Result<Node, RegexError> {
            let mut branches = vec![self.parse_concat()?];
            while self.peek() == Some('|') {
                self.pos += 1;
                branches.push(self.parse_concat()?);
            }
            Ok(if branches.len() == 1 {
                branches.pop().unwrap_or(Node::Empty)
            } else {
                Node::Alt(branches)
            })
        }

        fn parse_concat(&mut self) -> Result<Node, RegexError> {
            let mut items = Vec::new();
            // Start of the repetition operator just parsed, if the previous
            // token was one: Go rejects stacked operators such as `a**`.
            let mut last_repeat: Option<usize> = None;
            while let Some(c) = self.peek() {
                let start = self.pos;
                match c {
                    '|' | ')' => break,
                    '*' | '+' | '?' => {
                        self.pos += 1;
                        let (min, max) = match c {
                            '*' => (0, None),
                            '+' => (1, None),
                            _ => (0, Some(1)),
                        };
                        self.repeat(&mut items, min, max, start, last_repeat)?;
                        last_repeat = Some(start);
                        continue;
                    }
                    '{' => {
                        if let Some((min, max)) = self.parse_braces()? {
                            self.repeat(&mut items, min, max, start, last_repeat)?;
                            last_repeat = Some(start);
                            continue;
                        }
                        self.pos += 1;
                        items.push(self.literal('{'));
                    }
                    '\\' if self.peek_at(1) == Some('Q') => {
                        // Each quoted character is its own item, so a
                        // following `*` repeats only the last one.
                        self.pos += 2;
                        while let Some(c) = self.bump() {
                            if c == '\\' && self.peek() == Some('E') {
                                self.pos += 1;
                                break;
                            }
                            items.push(self.literal(c));
                        }
                    }
                    _ => {
                        if let Some(node) = self.parse_atom()? {
                            items.push(node);
                        }
                    }
                }
                last_repeat = None;
            }
            Ok(match items.len() {
                0 => Node::Empty,
                1 => items.pop().unwrap_or(Node::Empty),
                _ => Node::Concat(items),
            })
        }

        fn repeat(
            &mut self,
            items: &mut Vec<Node>,
            min: u32,
            max: Option<u32>,
            start: usize,
            last_repeat: Option<usize>,
        ) -> Result<(), RegexError> {
            if self.peek() == Some('?') {
                self.pos += 1; // lazy: irrelevant for a yes/no answer
            }
            if let Some(prev) = last_repeat {
                return err(format!(
                    "invalid nested repetition operator: `{}`",
                    self.text(prev, self.pos)
                ));
            }
            let Some(sub) = items.pop() else {
                return err(format!(
                    "missing argument to repetition operator: `{}`",
                    self.text(start, self.pos)
                ));
            };
            items.push(Node::Repeat {
                sub: Box::new(sub),
                min,
                max,
            });
            Ok(())
        }

        /// Parses `{n}`, `{n,}` or `{n,m}` at the current `{`. `Ok(None)`
        /// means it is not a repetition, and `{` is a literal.
        fn parse_braces(&mut self) -> Result<Option<(u32, Option<u32>)>, RegexError> {
            let start = self.pos;
            let Some((min, mut i)) = self.parse_int(start + 1) else {
                return Ok(None);
            };
            let max = match self.chars.get(i) {
                Some('}') => Some(min),
                Some(',') => {
                    i += 1;
                    if self.chars.get(i) == Some(&'}') {
                        None
                    } else {
                        let Some((max, j)) = self.parse_int(i) else {
                            return Ok(None);
                        };
                        i = j;
                        if self.chars.get(i) != Some(&'}') {
                            return Ok(None);
                        }
                        Some(max)
                    }
                }
                _ => return Ok(None),
            };
            i += 1; // the `}`
            if min > MAX_REPEAT || max.is_some_and(|m| m > MAX_REPEAT || m < min) {
                return err(format!("invalid repeat count: `{}`", self.text(start, i)));
            }
            self.pos = i;
            Ok(Some((min, max)))
        }

        /// Decimal number at `i` without leading zeros; saturates when huge.
        fn parse_int(&self, mut i: usize) -> Option<(u32, usize)> {
            let first = self.chars.get(i)?.to_digit(10)?;
            if first == 0 && self.chars.get(i + 1).is_some_and(char::is_ascii_digit) {
                return None;
            }
            let mut v = first;
            i += 1;
            while let Some(d) = self.chars.get(i).and_then(|c| c.to_digit(10)) {
                v = v.saturating_mul(10).saturating_add(d);
                i += 1;
            }
            Some((v, i))
        }

        /// Parses one atom; `None` for a flag setting such as `(?i)`.
        fn parse_atom(&mut self) -> Result<Option<Node>, RegexError> {
            let start = self.pos;
            let Some(c) = self.bump() else {
                return Ok(None);
            };
            Ok(Some(match c {
                '(' => return self.parse_group(start),
                '[' => self.parse_class(start)?,
                '.' => Node::Any(self.flags.dot_nl),
                '^' => Node::Look(if self.flags.multi_line {
                    Look::LineStart
                } else {
                    Look::TextStart
                }),
                '$' => Node::Look(if self.flags.multi_line {
                    Look::LineEnd
                } else {
                    Look::TextEnd
                }),
                '\\' => self.parse_backslash(start)?,
                c => self.literal(c),
            }))
        }

        fn parse_group(&mut self, start: usize) -> Result<Option<Node>, RegexError> {
            if self.depth >= MAX_NESTING {
                return err("expression nests too deeply");
            }
            let saved = self.flags;
            if self.peek() == Some('?') {
                self.pos += 1;
                if self.peek() == Some('P') && self.peek_at(1) == Some('<') {
                    self.pos += 2;
                    self.parse_group_name(start)?;
                } else if self.peek() == Some('<') {
                    self.pos += 1;
                    self.parse_group_name(start)?;
                } else if !self.parse_flags(start)? {
                    // `(?flags)`: applies to the rest of the enclosing group.
                    return Ok(None);
                }
            }
            self.depth += 1;
            let body = self.parse_alt()?;
            self.depth -= 1;
            if self.bump() != Some(')') {
                return err(format!("missing closing ): `{}`", self.rest(0)));
            }
            self.flags = saved;
            Ok(Some(body))
        }

        fn parse_group_name(&mut self, start: usize) -> Result<(), RegexError> {
            let name_start = self.pos;
            while let Some(c) = self.bump() {
                if c == '>' {
                    let name = &self.chars[name_start..self.pos - 1];
                    if !name.is_empty()
                        && name.iter().all(|&c| c == '_' || c.is_ascii_alphanumeric())
                    {
                        return Ok(());
                    }
                    break;
                }
            }
            err(format!(
                "invalid named capture: `{}`",
                self.text(start, self.pos)
            ))
        }

        /// Parses flags after `(?`. Returns true for `(?flags:` (a group
        /// follows) and false for `(?flags)`.
        fn parse_flags(&mut self, start: usize) -> Result<bool, RegexError> {
            let mut flags = self.flags;
            let mut negate = false;
            let mut saw_flag = false;
            while let Some(c) = self.bump() {
                match c {
                    'i' => flags.fold = !negate,
                    'm' => flags.multi_line = !negate,
                    's' => flags.dot_nl = !negate,
                    'U' => {}
                    '-' if !negate => {
                        negate = true;
                        saw_flag = false;
                        continue;
                    }
                    ':' | ')' if !negate || saw_flag => {
                        self.flags = flags;
                        return Ok(c == ':');
                    }
                    _ => break,
                }
                saw_flag = true;
            }
            err(format!(
                "invalid or unsupported Perl syntax: `{}`",
                self.text(start, self.pos)
            ))
        }

        fn parse_backslash(&mut self, start: usize) -> Result<Node, RegexError> {
            let Some(c) = self.peek() else {
                return err("trailing backslash at end of expression");
            };
            let look = match c {
                'A' => Some(Look::TextStart),
                'z' => Some(Look::TextEnd),
                'b' => Some(Look::WordBoundary),
                'B' => Some(Look::NotWordBoundary),
                _ => None,
            };
            if let Some(look) = look {
                self.pos += 1;
                return Ok(Node::Look(look));
            }
            if let Some((ranges, negated)) = perl_class(c) {
                self.pos += 1;
                return Ok(self.class(ranges.to_vec(), negated));
            }
            match c {
                'p' | 'P' => err(format!(
                    "unsupported Unicode character class: `{}`",
                    self.text(start, self.pos + 2)
                )),
                'C' => err("unsupported escape sequence: `\\C`"),
                _ => {
                    let c = self.parse_escape(start)?;
                    Ok(self.literal(c))
                }
            }
        }

        /// Parses the escape whose backslash is at `start`; the current
        /// position is just after the backslash.
        fn parse_escape(&mut self, start: usize) -> Result<char, RegexError> {
            let Some(c) = self.bump() else {
                return err("trailing backslash at end of expression");
            };
            let bad = |p: &Self| {
                err(format!(
                    "invalid escape sequence: `{}`",
                    p.text(start, p.pos)
                ))
            };
            match c {
                '1'..='7' if !matches!(self.peek(), Some('0'..='7')) => bad(self),
                '0'..='7' => {
                    let mut v = c as u32 - '0' as u32;
                    for _ in 0..2 {
                        match self.peek() {
                            Some(d @ '0'..='7') => {
                                v = v * 8 + (d as u32 - '0' as u32);
                                self.pos += 1;
                            }
                            _ => break,
                        }
                    }
                    char::from_u32(v).map_or_else(|| bad(self), Ok)
                }
                'x' => {
                    let mut v: u32 = 0;
                    if self.peek() == Some('{') {
                        self.pos += 1;
                        let mut digits = 0;
                        loop {
                            match self.bump() {
                                Some('}') if digits > 0 => break,
                                Some(d) if d.is_ascii_hexdigit() && v <= 0x10FFFF => {
                                    v = v * 16 + d.to_digit(16).unwrap_or(0);
                                    digits += 1;
                                }
                                _ => return bad(self),
                            }
                        }
                    } else {
                        for _ in 0..2 {
                            match self.bump() {
                                Some(d) if d.is_ascii_hexdigit() => {
                                    v = v * 16 + d.to_digit(16).unwrap_or(0)
                                }
                                _ => return bad(self),
                            }
                        }
                    }
                    char::from_u32(v).map_or_else(|| bad(self), Ok)
                }
                'a' => Ok('\x07'),
                'f' => Ok('\x0C'),
                'n' => Ok('\n'),
                'r' => Ok('\r'),
                't' => Ok('\t'),
                'v' => Ok('\x0B'),
                c if c.is_ascii() && !c.is_ascii_alphanumeric() => Ok(c),
                _ => bad(self),
            }
        }

        /// Parses a bracketed class; the current position is after `[`.
        fn parse_class(&mut self, start: usize) -> Result<Node, RegexError> {
            let negated = self.peek() == Some('^');
            if negated {
                self.pos += 1;
            }
            let mut ranges = Vec::new();
            let mut first = true;
            loop {
                let Some(c) = self.peek() else {
                    return err(format!("missing closing ]: `{}`", self.rest(start)));
                };
                if c == ']' && !first {
                    self.pos += 1;
                    break;
                }
                first = false;
                if c == '['
                    && self.peek_at(1) == Some(':')
                    && self.parse_posix_class(&mut ranges)?
                {
                    continue;
                }
                if c == '\\' {
                    if let Some(class) = self.peek_at(1).and_then(perl_class) {
                        self.pos += 2;
                        add_class(&mut ranges, class);
                        continue;
                    }
                    if matches!(self.peek_at(1), Some('p' | 'P')) {
                        return err(format!(
                            "unsupported Unicode character class: `{}`",
                            self.text(self.pos, self.pos + 3)
                        ));
                    }
                }
                let range_start = self.pos;
                let lo = self.class_char(start)?;
                let mut hi = lo;
                if self.peek() == Some('-') && self.peek_at(1).is_some_and(|c| c != ']') {
                    self.pos += 1;
                    hi = self.class_char(start)?;
                    if hi < lo {
                        return err(format!(
                            "invalid character class range: `{}`",
                            self.text(range_start, self.pos)
                        ));
                    }
                }
                ranges.push((lo, hi));
            }
            Ok(self.class(ranges, negated))
        }

        fn class_char(&mut self, class_start: usize) -> Result<char, RegexError> {
            match self.bump() {
                None => err(format!("missing closing ]: `{}`", self.rest(class_start))),
                Some('\\') => self.parse_escape(self.pos - 1),
                Some(c) => Ok(c),
            }
        }

        /// Parses `[:name:]` or `[:^name:]` at the current `[`; false if
        /// there is no closing `:]`, in which case `[` is an ordinary member.
        fn parse_posix_class(
            &mut self,
            ranges: &mut Vec<(char, char)>,
        ) -> Result<bool, RegexError> {
            let body_start = self.pos + 2;
            let Some(len) = self.chars[body_start..]
                .windows(2)
                .position(|w| w == [':', ']'])
            else {
                return Ok(false);
            };
            let name: String = self.chars[body_start..body_start + len].iter().collect();
            let (negated, base) = match name.strip_prefix('^') {
                Some(base) => (true, base),
                None => (false, name.as_str()),
            };
            let Some(class) = posix_class(base) else {
                return err(format!(
                    "invalid character class range: `{}`",
                    self.text(self.pos, body_start + len + 2)
                ));
            };
            self.pos = body_start + len + 2;
            add_class(ranges, (class, negated));
            Ok(true)
        }
    }

    type RangeSet = &'static [(char, char)];

    fn perl_class(c: char) -> Option<(RangeSet, bool)> {
        const DIGIT: RangeSet = &[('0', '9')];
        const SPACE: RangeSet = &[('\t', '\n'), ('\x0C', '\r'), (' ', ' ')];
        const WORD: RangeSet = &[('0', '9'), ('A', 'Z'), ('_', '_'), ('a', 'z')];
        Some(match c {
            'd' => (DIGIT, false),
            'D' => (DIGIT, true),
            's' => (SPACE, false),
            'S' => (SPACE, true),
            'w' => (WORD, false),
            'W' => (WORD, true),
            _ => return None,
        })
    }

    fn posix_class(name: &str) -> Option<RangeSet> {
        Some(match name {
            "alnum" => &[('0', '9'), ('A', 'Z'), ('a', 'z')],
            "alpha" => &[('A', 'Z'), ('a', 'z')],
            "ascii" => &[('\0', '\x7F')],
            "blank" => &[('\t', '\t'), (' ', ' ')],
            "cntrl" => &[('\0', '\x1F'), ('\x7F', '\x7F')],
            "digit" => &[('0', '9')],
            "graph" => &[('!', '~')],
            "lower" => &[('a', 'z')],
            "print" => &[(' ', '~')],
            "punct" => &[('!', '/'), (':', '@'), ('[', '`'), ('{', '~')],
            "space" => &[('\t', '\r'), (' ', ' ')],
            "upper" => &[('A', 'Z')],
            "word" => &[('0', '9'), ('A', 'Z'), ('_', '_'), ('a', 'z')],
            "xdigit" => &[('0', '9'), ('A', 'F'), ('a', 'f')],
            _ => return None,
        })
    }

    fn add_class(ranges: &mut Vec<(char, char)>, (set, negated): (RangeSet, bool)) {
        if !negated {
            ranges.extend_from_slice(set);
            return;
        }
        // `set` is sorted and disjoint; add its complement.
        let mut next: u32 = 0;
        for &(lo, hi) in set {
            if lo as u32 > next {
                push_scalar_range(ranges, next, lo as u32 - 1);
            }
            next = hi as u32 + 1;
        }
        push_scalar_range(ranges, next, char::MAX as u32);
    }

    /// Adds `lo..=hi` minus the surrogate gap.
    fn push_scalar_range(ranges: &mut Vec<(char, char)>, lo: u32, hi: u32) {
        const GAP_LO: u32 = 0xD800;
        const GAP_HI: u32 = 0xDFFF;
        let mut push = |lo: u32, hi: u32| {
            if let (Some(lo), Some(hi)) = (char::from_u32(lo), char::from_u32(hi))
                && lo <= hi
            {
                ranges.push((lo, hi));
            }
        };
        if lo < GAP_LO {
            push(lo, hi.min(GAP_LO - 1));
        }
        if hi > GAP_HI {
            push(lo.max(GAP_HI + 1), hi);
        }
    }

    struct Compiler {
        prog: Vec<Inst>,
    }

    impl Compiler {
        fn emit(&mut self, inst: Inst) -> Result<usize, RegexError> {
            if self.prog.len() >= MAX_PROGRAM_LEN {
                return err("expression too large");
            }
            self.prog.push(inst);
            Ok(self.prog.len() - 1)
        }

        fn compile(&mut self, node: &Node, depth: usize) -> Result<(), RegexError> {
            if depth > 2 * MAX_NESTING {
                return err("expression nests too deeply");
            }
            match node {
                Node::Empty => {}
                &Node::Char(c, fold) => {
                    self.emit(if fold {
                        Inst::FoldChar(simple_fold(c))
                    } else {
                        Inst::Char(c)
                    })?;
                }
                &Node::Any(nl) => {
                    self.emit(if nl { Inst::AnyChar } else { Inst::AnyNotNl })?;
                }
                &Node::Class(idx) => {
                    self.emit(Inst::Class(idx))?;
                }
                &Node::Look(look) => {
                    self.emit(Inst::Assert(look))?;
                }
                Node::Concat(items) => {
                    for item in items {
                        self.compile(item, depth + 1)?;
                    }
                }
                Node::Alt(branches) => {
                    let mut jumps = Vec::new();
                    let (last, init) = branches
                        .split_last()
                        .ok_or_else(|| RegexError("empty alternation".into()))?;
                    for branch in init {
                        let split = self.emit(Inst::Split(0, 0))?;
                        self.compile(branch, depth + 1)?;
                        jumps.push(self.emit(Inst::Jmp(0))?);
                        self.prog[split] = Inst::Split(split + 1, self.prog.len());
                    }
                    self.compile(last, depth + 1)?;
                    let end = self.prog.len();
                    for j in jumps {
                        self.prog[j] = Inst::Jmp(end);
                    }
                }
                Node::Repeat { sub, min, max } => {
                    self.compile_repeat(sub, *min, *max, depth + 1)?
                }
            }
            Ok(())
        }

        fn compile_repeat(
            &mut self,
            sub: &Node,
            min: u32,
            max: Option<u32>,
            depth: usize,
        ) -> Result<(), RegexError> {
            match max {
                None => {
                    // x{n,} = x{n-1} x+, and x{0,} = x*.
                    for _ in 1..min {
                        self.compile(sub, depth)?;
                    }
                    if min == 0 {
                        let split = self.emit(Inst::Split(0, 0))?;
                        self.compile(sub, depth)?;
                        self.emit(Inst::Jmp(split))?;
                        self.prog[split] = Inst::Split(split + 1, self.prog.len());
                    } else {
                        let begin = self.prog.len();
                        self.compile(sub, depth)?;
                        let split = self.emit(Inst::Split(0, 0))?;
                        self.prog[split] = Inst::Split(begin, split + 1);
                    }
                }
                Some(max) => {
                    for _ in 0..min {
                        self.compile(sub, depth)?;
                    }
                    // Each optional copy may be skipped to the end, which
                    // for a yes/no match is the same as nesting them.
                    let mut splits = Vec::new();
                    for _ in min..max {
                        splits.push(self.emit(Inst::Split(0, 0))?);
                        self.compile(sub, depth)?;
                    }
                    let end = self.prog.len();
                    for split in splits {
                        self.prog[split] = Inst::Split(split + 1, end);
                    }
                }
            }
            Ok(())
        }
    }

    /// A set of program counters with O(1) insert, membership and clear.
    struct PcSet {
        member: Vec<bool>,
        list: Vec<usize>,
    }

    impl PcSet {
        fn new(n: usize) -> Self {
            PcSet {
                member: vec![false; n],
                list: Vec::with_capacity(n),
            }
        }

        fn insert(&mut self, pc: usize) -> bool {
            if self.member[pc] {
                return false;
            }
            self.member[pc] = true;
            self.list.push(pc);
            true
        }

        fn clear(&mut self) {
            for &pc in &self.list {
                self.member[pc] = false;
            }
            self.list.clear();
        }
    }

    impl Regex {
        /// Compiles `pattern`.
        pub(super) fn new(pattern: &str) -> Result<Regex, RegexError> {
            if pattern.len() > MAX_PATTERN_LEN {
                return err(format!("expression longer than {MAX_PATTERN_LEN} bytes"));
            }
            let mut parser = Parser {
                chars: pattern.chars().collect(),
                pos: 0,
                flags: Flags::default(),
                depth: 0,
                classes: Vec::new(),
            };
            let node = parser.parse_alt()?;
            if parser.pos < parser.chars.len() {
                return err(format!("unexpected ): `{pattern}`"));
            }
            let mut compiler = Compiler { prog: Vec::new() };
            compiler.compile(&node, 0)?;
            compiler.emit(Inst::Match)?;
            Ok(Regex {
                prog: compiler.prog,
                classes: parser.classes,
            })
        }

        /// Reports whether the expression matches anywhere in `text`.
        pub(super) fn is_match(&self, text: &str) -> bool {
            let chars: Vec<char> = text.chars().collect();
            let n = self.prog.len();
            let mut current = PcSet::new(n);
            let mut next = PcSet::new(n);
            let mut stack = Vec::new();
            for i in 0..=chars.len() {
                let prev = i.checked_sub(1).map(|j| chars[j]);
                let here = chars.get(i).copied();
                // Unanchored search: a new thread starts at every position.
                if self.add(&mut current, &mut stack, 0, prev, here) {
                    return true;
                }
                let Some(c) = here else { break };
                let after = chars.get(i + 1).copied();
                next.clear();
                for &pc in &current.list {
                    let ok = match self.prog[pc] {
                        Inst::Char(x) => c == x,
                        Inst::FoldChar(x) => simple_fold(c) == x,
                        Inst::AnyChar => true,
                        Inst::AnyNotNl => c != '\n',
                        Inst::Class(k) => self.classes[k].matches(c),
                        _ => false,
                    };
                    if ok && self.add(&mut next, &mut stack, pc + 1, Some(c), after) {
                        return true;
                    }
                }
                std::mem::swap(&mut current, &mut next);
            }
            false
        }

        /// Adds the thread at `pc` and everything reachable from it without
        /// consuming input; true if that reaches `Match`.
        fn add(
            &self,
            set: &mut PcSet,
            stack: &mut Vec<usize>,
            pc: usize,
            prev: Option<char>,
            next: Option<char>,
        ) -> bool {
            stack.clear();
            stack.push(pc);
            while let Some(pc) = stack.pop() {
                if !set.insert(pc) {
                    continue;
                }
                match self.prog[pc] {
                    Inst::Jmp(x) => stack.push(x),
                    Inst::Split(x, y) => {
                        stack.push(y);
                        stack.push(x);
                    }
                    Inst::Assert(look) if look.holds(prev, next) => stack.push(pc + 1),
                    Inst::Match => return true,
                    _ => {}
                }
            }
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    // --- containerd's filter tests ------------------------------------------

    #[derive(Debug, Clone, PartialEq)]
    struct Entry {
        name: &'static str,
        other: &'static str,
        labels: BTreeMap<String, String>,
    }

    impl Adaptor for Entry {
        fn field(&self, path: &[String]) -> Option<String> {
            let present = |s: &str| (!s.is_empty()).then(|| s.to_owned());
            match path.first()?.as_str() {
                "name" => present(self.name),
                "other" => present(self.other),
                "labels" => self.labels.get(&path[1..].join(".")).cloned(),
                _ => None,
            }
        }
    }

    fn entry(name: &'static str, other: &'static str, labels: &[(&str, &str)]) -> Entry {
        Entry {
            name,
            other,
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    fn corpus() -> Vec<Entry> {
        vec![
            entry("foo", "", &[("foo", "true")]),
            entry("bar", "", &[]),
            entry(
                "foo",
                "",
                &[("foo", "present"), ("more complex label", "present")],
            ),
            entry("bar", "", &[("bar", "true")]),
            entry(
                "fooer",
                "",
                &[("more complex label with \\ and \"", "present")],
            ),
            entry(
                "fooer",
                "",
                &[("more complex label with \\ and \".post", "present")],
            ),
            entry("baz", "too complex, yo", &[]),
            entry("bazo", "abc", &[]),
            entry("compound", "", &[("foo", "omg_asdf.asdf-qwer")]),
        ]
    }

    /// Indexes into `corpus()` of the entries `input` selects.
    fn select(input: &str) -> Vec<usize> {
        let filter = parse(input).unwrap_or_else(|e| panic!("{input:?}: {e}"));
        corpus()
            .iter()
            .enumerate()
            .filter(|(_, e)| filter.matches(*e))
            .map(|(i, _)| i)
            .collect()
    }

    fn parse_err(input: &str) -> FilterError {
        match parse(input) {
            Ok(f) => panic!("{input:?} parsed: {f:?}"),
            Err(e) => e,
        }
    }

    #[test]
    fn containerd_filter_cases() {
        let all: Vec<usize> = (0..9).collect();
        let cases: &[(&str, &[usize])] = &[
            ("", &all[..]),
            ("name", &all[..]),
            ("labels.foo", &[0, 2, 8]),
            ("labels.foo,name", &[0, 2, 8]),
            ("labels.foo==true", &[0]),
            ("labels.foo==omg_asdf.asdf-qwer", &[8]),
            ("name==bar", &[1, 3]),
            ("name!=bar", &[0, 2, 4, 5, 6, 7, 8]),
            ("name==bar,labels.bar", &[3]),
            ("other==\"too complex, yo\"", &[6]),
            ("other~=[abc]+,name!=foo", &[6, 7]),
            ("other~=/[abc]+/,name!=foo", &[6, 7]),
            ("other~=/[abc]{1,2}/,name!=foo", &[6, 7]),
            ("other~=/[abc]{0,1}\"\\//,name!=foo", &[]),
            ("name==bar,labels.bar==true", &[3]),
            ("name==bar,labels.bar==wrong", &[]),
            (r#"name==foo,labels."more complex label""#, &[2]),
            (
                r#"labels."more complex label with \\ and \""==present"#,
                &[4],
            ),
            (
                r#"labels."more complex label with \\ and \"".post==present"#,
                &[5],
            ),
        ];
        for (input, want) in cases {
            assert_eq!(select(input), *want, "filter {input:?}");
        }
    }

    #[test]
    fn containerd_error_messages() {
        let cases = [
            (
                "labels.|foo|==omg_asdf.asdf-qwer",
                "filters: parse error: [labels. >|||< foo|==omg_asdf.asdf-qwer]: invalid quote encountered",
            ),
            (
                r#"labels.?"more complex label with \\ and \"".post==present"#,
                r#"filters: parse error: [labels. >|?|< "more complex label with \\ and \"".post==present]: expected field or quoted"#,
            ),
            (
                "name==foo,",
                "filters: parse error: [name==foo,]: expected field or quoted",
            ),
            (
                "labels.",
                "filters: parse error: [labels.]: expected field or quoted",
            ),
            (
                "image~=,id?=?fbaq",
                "filters: parse error: [image~= >|,|< id?=?fbaq]: expected value or quoted",
            ),
            (
                "labels.ns/key==value",
                "filters: parse error: [labels.ns >|/|< key==value]: quoted literal not terminated",
            ),
            (
                "labels.key==/value",
                "filters: parse error: [labels.key== >|/|< value]: quoted literal not terminated",
            ),
        ];
        for (input, want) in cases {
            assert_eq!(parse_err(input).to_string(), want, "filter {input:?}");
        }
    }

    // --- containerd's scanner tests -----------------------------------------

    fn tokens(input: &str) -> Vec<(usize, Token, String, Option<&'static str>)> {
        let mut sc = Scanner::new(input);
        let mut out = Vec::new();
        loop {
            let (pos, token, text) = sc.scan();
            let err = if token == Token::Illegal {
                sc.err
            } else {
                None
            };
            out.push((pos, token, text.to_owned(), err));
            if token == Token::Eof {
                break;
            }
            assert!(out.len() < 100, "scanner does not terminate on {input:?}");
        }
        assert_eq!(sc.scan().1, Token::Eof, "scanner must stay at EOF");
        out
    }

    #[test]
    fn scanner_tokens() {
        use Token::*;
        let t = |pos: usize, token: Token, text: &str| (pos, token, text.to_owned(), None);
        let bad =
            |pos: usize, text: &str, err: &'static str| (pos, Illegal, text.to_owned(), Some(err));
        let cases = vec![
            ("name", vec![t(0, Field, "name"), t(4, Eof, "")]),
            (
                "name==value,foo!=bar",
                vec![
                    t(0, Field, "name"),
                    t(4, Operator, "=="),
                    t(6, Value, "value"),
                    t(11, Separator, ","),
                    t(12, Field, "foo"),
                    t(15, Operator, "!="),
                    t(17, Value, "bar"),
                    t(20, Eof, ""),
                ],
            ),
            (
                "name==value,labels.foo=value,other.bar~=match",
                vec![
                    t(0, Field, "name"),
                    t(4, Operator, "=="),
                    t(6, Value, "value"),
                    t(11, Separator, ","),
                    t(12, Field, "labels"),
                    t(18, Separator, "."),
                    t(19, Field, "foo"),
                    t(22, Operator, "="),
                    t(23, Value, "value"),
                    t(28, Separator, ","),
                    t(29, Field, "other"),
                    t(34, Separator, "."),
                    t(35, Field, "bar"),
                    t(38, Operator, "~="),
                    t(40, Value, "match"),
                    t(45, Eof, ""),
                ],
            ),
            (
                "name~=[abc]+,foo=test",
                vec![
                    t(0, Field, "name"),
                    t(4, Operator, "~="),
                    t(6, Value, "[abc]+"),
                    t(12, Separator, ","),
                    t(13, Field, "foo"),
                    t(16, Operator, "="),
                    t(17, Value, "test"),
                    t(21, Eof, ""),
                ],
            ),
            (
                r"name~=[abc]\+,foo=test",
                vec![
                    t(0, Field, "name"),
                    t(4, Operator, "~="),
                    t(6, Value, r"[abc]\+"),
                    t(13, Separator, ","),
                    t(14, Field, "foo"),
                    t(17, Operator, "="),
                    t(18, Value, "test"),
                    t(22, Eof, ""),
                ],
            ),
            (
                "name~=/[abc]{0,2}/,foo=test",
                vec![
                    t(0, Field, "name"),
                    t(4, Operator, "~="),
                    t(6, Quoted, "/[abc]{0,2}/"),
                    t(18, Separator, ","),
                    t(19, Field, "foo"),
                    t(22, Operator, "="),
                    t(23, Value, "test"),
                    t(27, Eof, ""),
                ],
            ),
            (
                "name~=牛,labels.moo=true",
                vec![
                    t(0, Field, "name"),
                    t(4, Operator, "~="),
                    t(6, Value, "牛"),
                    t(9, Separator, ","),
                    t(10, Field, "labels"),
                    t(16, Separator, "."),
                    t(17, Field, "moo"),
                    t(20, Operator, "="),
                    t(21, Value, "true"),
                    t(25, Eof, ""),
                ],
            ),
            (
                "name~=|牛|,labels.moo=true",
                vec![
                    t(0, Field, "name"),
                    t(4, Operator, "~="),
                    t(6, Quoted, "|牛|"),
                    t(11, Separator, ","),
                    t(12, Field, "labels"),
                    t(18, Separator, "."),
                    t(19, Field, "moo"),
                    t(22, Operator, "="),
                    t(23, Value, "true"),
                    t(27, Eof, ""),
                ],
            ),
            (
                r#"name~="asdf\n\tfooo""#,
                vec![
                    t(0, Field, "name"),
                    t(4, Operator, "~="),
                    t(6, Quoted, r#""asdf\n\tfooo""#),
                    t(20, Eof, ""),
                ],
            ),
            (
                "foo\x00bar",
                vec![
                    t(0, Field, "foo"),
                    (3, Illegal, String::new(), Some("unexpected null")),
                    t(4, Field, "bar"),
                    t(7, Eof, ""),
                ],
            ),
            (
                "foo = bar    ",
                vec![
                    t(0, Field, "foo"),
                    t(4, Operator, "="),
                    t(6, Value, "bar"),
                    t(13, Eof, ""),
                ],
            ),
            (
                "compound.labels==punctuated_value.foo-bar",
                vec![
                    t(0, Field, "compound"),
                    t(8, Separator, "."),
                    t(9, Field, "labels"),
                    t(15, Operator, "=="),
                    t(17, Value, "punctuated_value.foo-bar"),
                    t(41, Eof, ""),
                ],
            ),
            (
                "interrupted=",
                vec![
                    t(0, Field, "interrupted"),
                    t(11, Operator, "="),
                    t(12, Eof, ""),
                ],
            ),
            (
                "doublevalue=value value",
                vec![
                    t(0, Field, "doublevalue"),
                    t(11, Operator, "="),
                    t(12, Value, "value"),
                    t(18, Field, "value"),
                    t(23, Eof, ""),
                ],
            ),
            (
                r#""leading quote".postquote==value"#,
                vec![
                    t(0, Quoted, r#""leading quote""#),
                    t(15, Separator, "."),
                    t(16, Field, "postquote"),
                    t(25, Operator, "=="),
                    t(27, Value, "value"),
                    t(32, Eof, ""),
                ],
            ),
            (
                "input==,id!=ff",
                vec![
                    t(0, Field, "input"),
                    t(5, Operator, "=="),
                    t(7, Separator, ","),
                    t(8, Field, "id"),
                    t(10, Operator, "!="),
                    t(12, Value, "ff"),
                    t(14, Eof, ""),
                ],
            ),
            (
                r"input~=/foo\/bar/,id!=ff",
                vec![
                    t(0, Field, "input"),
                    t(5, Operator, "~="),
                    t(7, Quoted, r"/foo\/bar/"),
                    t(17, Separator, ","),
                    t(18, Field, "id"),
                    t(20, Operator, "!="),
                    t(22, Value, "ff"),
                    t(24, Eof, ""),
                ],
            ),
            (
                "input~=|foo/bar|,id!=ff",
                vec![
                    t(0, Field, "input"),
                    t(5, Operator, "~="),
                    t(7, Quoted, "|foo/bar|"),
                    t(16, Separator, ","),
                    t(17, Field, "id"),
                    t(19, Operator, "!="),
                    t(21, Value, "ff"),
                    t(23, Eof, ""),
                ],
            ),
            (
                "labels.containerd.io/key==value",
                vec![
                    t(0, Field, "labels"),
                    t(6, Separator, "."),
                    t(7, Field, "containerd"),
                    t(17, Separator, "."),
                    t(18, Field, "io"),
                    bad(20, "/key==value", "quoted literal not terminated"),
                    t(31, Eof, ""),
                ],
            ),
            (
                "labels.\"containerd.io\nkey\"==value",
                vec![
                    t(0, Field, "labels"),
                    t(6, Separator, "."),
                    bad(7, "\"containerd.io\n", "quoted literal not terminated"),
                    t(22, Field, "key"),
                    bad(25, "\"==value", "quoted literal not terminated"),
                    t(33, Eof, ""),
                ],
            ),
            (
                r#"labels."\g""#,
                vec![
                    t(0, Field, "labels"),
                    t(6, Separator, "."),
                    bad(7, r#""\g""#, "illegal escape sequence"),
                    t(11, Eof, ""),
                ],
            ),
            (
                r#"labels."\xaz""#,
                vec![
                    t(0, Field, "labels"),
                    t(6, Separator, "."),
                    bad(7, r#""\xaz""#, "illegal numeric escape sequence"),
                    t(13, Eof, ""),
                ],
            ),
            // Fields may contain dashes and digits; `?` starts no token.
            (
                "io.cri-containerd.kind?",
                vec![
                    t(0, Field, "io"),
                    t(2, Separator, "."),
                    t(3, Field, "cri-containerd"),
                    t(17, Separator, "."),
                    t(18, Field, "kind"),
                    t(22, Other, ""),
                    t(23, Eof, ""),
                ],
            ),
        ];
        for (input, want) in cases {
            assert_eq!(tokens(input), want, "input {input:?}");
        }
    }

    // --- the snapshot testsuite's Walk cases ----------------------------------

    #[derive(Debug, Clone)]
    struct Info {
        name: &'static str,
        parent: &'static str,
        kind: &'static str,
        labels: BTreeMap<String, String>,
    }

    /// containerd's snapshot adaptor: name, parent and kind are always
    /// present; labels join the rest of the path with ".".
    impl Adaptor for Info {
        fn field(&self, path: &[String]) -> Option<String> {
            match path.first()?.as_str() {
                "name" => Some(self.name.to_owned()),
                "parent" => Some(self.parent.to_owned()),
                "kind" => Some(self.kind.to_owned()),
                "labels" if !self.labels.is_empty() => {
                    self.labels.get(&path[1..].join(".")).cloned()
                }
                _ => None,
            }
        }
    }

    fn info(
        name: &'static str,
        kind: &'static str,
        parent: &'static str,
        labels: &[(&str, &str)],
    ) -> Info {
        Info {
            name,
            parent,
            kind,
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    fn walk(snapshots: &[Info], filters: &[&str]) -> Vec<&'static str> {
        let set = parse_all(filters).unwrap_or_else(|e| panic!("{filters:?}: {e}"));
        let mut names: Vec<_> = snapshots
            .iter()
            .filter(|s| set.matches(*s))
            .map(|s| s.name)
            .collect();
        names.sort_unstable();
        names
    }

    fn sorted(mut names: Vec<&'static str>) -> Vec<&'static str> {
        names.sort_unstable();
        names
    }

    #[test]
    fn snapshot_testsuite_walk() {
        const ROOT: (&str, &str) = ("containerd.io/gc.root", "check-walk");
        let snapshots = [
            info("a-np", "active", "", &[ROOT]),
            info("p", "committed", "", &[ROOT]),
            info("a", "active", "p", &[ROOT]),
            info("v", "view", "p", &[ROOT]),
            info("p-wl", "committed", "", &[ROOT, ("l", "1")]),
            info("a-wl", "active", "p-wl", &[ROOT, ("l", "2")]),
            info("v-wl", "view", "p-wl", &[ROOT, ("l", "3")]),
            info("a-np-wl", "active", "", &[ROOT, ("l", "2")]),
        ];
        let cases: &[(&[&str], Vec<&str>)] = &[
            (
                &[r#"labels."containerd.io/gc.root"==check-walk"#],
                vec!["a-np", "p", "a", "v", "p-wl", "a-wl", "v-wl", "a-np-wl"],
            ),
            (
                &[r#"kind==active,labels."containerd.io/gc.root"==check-walk"#],
                vec!["a-np", "a", "a-wl", "a-np-wl"],
            ),
            (
                &[r#"kind==view,labels."containerd.io/gc.root"==check-walk"#],
                vec!["v", "v-wl"],
            ),
            (
                &[r#"kind==committed,labels."containerd.io/gc.root"==check-walk"#],
                vec!["p", "p-wl"],
            ),
            (&["name==p", "name==a-np-wl"], vec!["p", "a-np-wl"]),
            (&["name==a-wl,labels.l"], vec!["a-wl"]),
            (&["parent==p"], vec!["a", "v"]),
            (
                &[r#"parent!="",labels."containerd.io/gc.root"==check-walk"#],
                vec!["a", "v", "a-wl", "v-wl"],
            ),
            (&["labels.l"], vec!["p-wl", "a-wl", "v-wl", "a-np-wl"]),
            (&["labels.l==2"], vec!["a-wl", "a-np-wl"]),
            // No filters at all, and an empty filter, list everything.
            (
                &[],
                vec!["a-np", "p", "a", "v", "p-wl", "a-wl", "v-wl", "a-np-wl"],
            ),
            (
                &["", "name==p"],
                vec!["a-np", "p", "a", "v", "p-wl", "a-wl", "v-wl", "a-np-wl"],
            ),
            (
                &["kind~=^(view|committed)$"],
                vec!["p", "v", "p-wl", "v-wl"],
            ),
            (&["name~=-wl$,labels.l!=2"], vec!["p-wl", "v-wl"]),
        ];
        for (filters, want) in cases {
            assert_eq!(
                walk(&snapshots, filters),
                sorted(want.clone()),
                "filters {filters:?}"
            );
        }
    }

    #[test]
    fn snapshot_label_filters() {
        const REF: &str = "containerd.io/snapshot.ref";
        let snapshots = [
            info(
                "s1",
                "committed",
                "xyz",
                &[("l1", "v1"), (REF, "sha256:abc")],
            ),
            info("s2", "active", "", &[("l1", "v1")]),
            info("s3", "active", "xyz", &[("l1", "v2"), (REF, "sha256:def")]),
            info("a", "active", "", &[]),
        ];
        let cases: &[(&[&str], Vec<&str>)] = &[
            (&["labels.l1==v1"], vec!["s1", "s2"]),
            (&["kind==active,labels.l1==v1"], vec!["s2"]),
            (&["name==a"], vec!["a"]),
            (&["name==a,labels.l1"], vec![]),
            (&["name==s3,labels.l1"], vec!["s3"]),
            (&["parent==xyz"], vec!["s1", "s3"]),
            (&[r#"parent!="""#], vec!["s1", "s3"]),
            (&["labels.l1!=v1"], vec!["s3", "a"]),
            (
                &[r#"labels."containerd.io/snapshot.ref"==sha256:abc,parent==xyz"#],
                vec!["s1"],
            ),
            (
                &[r#"labels."containerd.io/snapshot.ref""#],
                vec!["s1", "s3"],
            ),
            // An unquoted dotted key names the same label.
            (&["labels.containerd.io==x"], vec![]),
            (
                &[r#"labels."containerd.io/snapshot.ref"~=^sha256:[0-9a-f]+$"#],
                vec!["s1", "s3"],
            ),
            (
                &[r#"labels."containerd.io/snapshot.ref"~=/:d/"#],
                vec!["s3"],
            ),
            (&["name==s1", "name==s2", "name==nope"], vec!["s1", "s2"]),
        ];
        for (filters, want) in cases {
            assert_eq!(
                walk(&snapshots, filters),
                sorted(want.clone()),
                "filters {filters:?}"
            );
        }
    }

    #[test]
    fn dotted_label_key_without_quotes() {
        let s = info("x", "view", "", &[("a.b.c", "1")]);
        assert!(parse("labels.a.b.c==1").unwrap().matches(&s));
        assert!(parse(r#"labels."a.b".c==1"#).unwrap().matches(&s));
        assert!(parse(r#"labels."a.b.c"==1"#).unwrap().matches(&s));
    }

    // --- semantics ---------------------------------------------------------------

    #[test]
    fn operators_on_absent_fields() {
        let nothing = |_: &[String]| -> Option<String> { None };
        let present_empty = |_: &[String]| -> Option<String> { Some(String::new()) };
        let check = |input: &str, absent: bool, empty: bool| {
            let f = parse(input).unwrap();
            assert_eq!(f.matches(&nothing), absent, "{input:?} on absent field");
            assert_eq!(f.matches(&present_empty), empty, "{input:?} on empty field");
        };
        check("x", false, true);
        check("x==\"\"", false, true);
        check("x==a", false, false);
        check("x!=a", true, true);
        check("x!=\"\"", false, false);
        check("x~=/.*/", true, true);
        check("x~=^$", true, true);
        check("x~=/./", false, false);
        check("x~=\".\"", false, false);
    }

    #[test]
    fn parse_all_is_a_disjunction() {
        let adaptor = |p: &[String]| -> Option<String> { (p[0] == "name").then(|| "b".to_owned()) };
        assert!(parse_all::<&str>(&[]).unwrap().matches(&adaptor));
        assert!(parse_all::<&str>(&[]).unwrap().is_always());
        assert!(
            parse_all(&["name==a", "name==b"])
                .unwrap()
                .matches(&adaptor)
        );
        assert!(
            !parse_all(&["name==a", "name==c"])
                .unwrap()
                .matches(&adaptor)
        );
        assert!(parse_all(&["name==a", ""]).unwrap().is_always());
        let owned = vec!["name==b".to_owned()];
        let set = parse_all(&owned).unwrap();
        assert!(!set.is_always());
        assert_eq!(set.filters().len(), 1);
        assert!(set.matches(&adaptor as &dyn Adaptor));

        let e = parse_all(&["name==a", "name==", "bad,,"]).unwrap_err();
        assert_eq!(e.input(), "name==");
        assert_eq!(e.position(), 6);
        assert_eq!(e.message(), "expected value or quoted");
    }

    #[test]
    fn selector_accessors() {
        let f: Filter = r#"labels."a b".c~=/x\/y/,name!=n,kind"#.parse().unwrap();
        let s = f.selectors();
        assert_eq!(s.len(), 3);
        assert_eq!(s[0].fieldpath(), ["labels", "a b", "c"]);
        assert_eq!(s[0].operator(), Operator::Matches);
        assert_eq!(s[0].value(), "x/y");
        assert_eq!(s[1].fieldpath(), ["name"]);
        assert_eq!(s[1].operator(), Operator::NotEqual);
        assert_eq!(s[1].value(), "n");
        assert_eq!(s[2].operator(), Operator::Present);
        assert_eq!(s[2].value(), "");
        assert_eq!(Operator::Present.to_string(), "?");
        assert_eq!(Operator::Equal.to_string(), "==");
        assert_eq!(Operator::NotEqual.as_str(), "!=");
        assert_eq!(Operator::Matches.as_str(), "~=");
        assert!(parse("").unwrap().is_always());
        assert!(Filter::always().is_always());
        assert!(FilterSet::always().is_always());
    }

    fn value_of(input: &str) -> Vec<u8> {
        let f = parse(input).unwrap_or_else(|e| panic!("{input:?}: {e}"));
        f.selectors()[0].value.clone()
    }

    #[test]
    fn quoting_and_escapes() {
        assert_eq!(value_of(r#"a=="x\ty\n\"\\""#), b"x\ty\n\"\\");
        assert_eq!(value_of(r#"a=="\a\b\f\r\v""#), b"\x07\x08\x0C\r\x0B");
        assert_eq!(
            value_of(r#"a=="\x41\101\u00e9\U0001F600""#),
            "AAé😀".as_bytes()
        );
        assert_eq!(value_of(r#"a=="\xff\377""#), b"\xff\xff");
        assert_eq!(value_of(r#"a=="\ud800""#), "\u{FFFD}".as_bytes());
        assert_eq!(value_of("a==\"a,b c\""), b"a,b c");
        assert_eq!(value_of("a==\"\""), b"");
        assert_eq!(value_of("a==牛"), "牛".as_bytes());
        assert_eq!(value_of("a=='x'"), b"'x'");
        assert_eq!(value_of("a==x\"y"), b"x\"y");
        assert_eq!(value_of("a==x/y|z=w"), b"x/y|z=w");
        assert_eq!(value_of("a==sha256:abc"), b"sha256:abc");
        assert_eq!(value_of("a==-1"), b"-1");
        // Alternate quotes only for regular expressions.
        assert_eq!(value_of(r"a~=/x\/y/"), b"x/y");
        assert_eq!(value_of(r"a~=|x/y\|z|"), b"x/y|z");
        assert_eq!(value_of(r#"a~="x\"y""#), b"x\"y");
        assert_eq!(value_of(r"a~=[abc]\+"), br"[abc]\+");
        // White space around operators and after commas is skipped.
        assert_eq!(value_of("  a ==  b"), b"b");
        assert_eq!(parse("a==b, c==d").unwrap().selectors().len(), 2);
        // Quoted field names.
        let f = parse(r#""a\x2eb".c"#).unwrap();
        assert_eq!(f.selectors()[0].fieldpath(), ["a.b", "c"]);
    }

    #[test]
    fn non_utf8_values() {
        let a = |_: &[String]| Some("\u{FFFD}".to_owned());
        assert!(!parse(r#"x=="\xff""#).unwrap().matches(&a));
        assert!(parse(r#"x!="\xff""#).unwrap().matches(&a));
        let e = parse_err(r#"x~="\xff""#);
        assert_eq!(e.message(), "invalid regular expression: invalid UTF-8");
        assert_eq!(e.position(), 3);
    }

    #[test]
    fn syntax_errors() {
        let cases: &[(&str, usize, &str)] = &[
            // unterminated quotes
            (r#"labels."abc"#, 7, "quoted literal not terminated"),
            (r#"a=="abc"#, 3, "quoted literal not terminated"),
            ("a~=/abc", 3, "quoted literal not terminated"),
            ("a==\"x\ny\"", 3, "quoted literal not terminated"),
            // dangling or bad operators
            ("name==", 6, "expected value or quoted"),
            ("name!=", 6, "expected value or quoted"),
            ("name~= ", 7, "expected value or quoted"),
            ("name=foo", 4, "unsupported operator \"=\""),
            ("name===foo", 4, "unsupported operator \"===\""),
            ("name~foo", 4, "unsupported operator \"~\""),
            ("name<foo", 4, r#"expected an operator ("=="|"!="|"~=")"#),
            ("name foo", 5, r#"expected an operator ("=="|"!="|"~=")"#),
            ("name==.foo", 6, "expected value or quoted"),
            // A bare value cannot start with a separator, operator or quote
            // character, even after `~=`: `.*` must be written `/.*/`.
            ("name~=.*", 6, "expected value or quoted"),
            ("name~==x", 4, "unsupported operator \"~==\""),
            ("name==!x", 4, "unsupported operator \"==!\""),
            ("name==|x|", 6, "invalid quote encountered"),
            ("name==/x/", 6, "invalid quote encountered"),
            // empty selectors
            (",", 0, "expected field or quoted"),
            ("a==b,,c", 5, "expected field or quoted"),
            ("a==b,", 5, "expected field or quoted"),
            (" ", 1, "expected field or quoted"),
            ("==a", 0, "expected field or quoted"),
            ("a..b", 2, "expected field or quoted"),
            (".a", 0, "expected field or quoted"),
            // trailing junk; containerd does not skip white space here
            ("a==b c", 4, "unexpected input:  "),
            ("a==b ", 4, "unexpected input:  "),
            ("a ", 2, r#"expected an operator ("=="|"!="|"~=")"#),
            (r#"a=="b"c"#, 6, "unexpected input: c"),
            ("a==b\u{200B}", 4, "unexpected input: \u{200B}"),
            // field syntax
            (
                "labels.containerd.io/key",
                20,
                "quoted literal not terminated",
            ),
            ("labels.'x'", 7, "expected field or quoted"),
            ("labels.|x|", 7, "invalid quote encountered"),
            ("labels.\u{e9}", 7, "expected field or quoted"),
            // escapes
            (r#"a=="\g""#, 3, "illegal escape sequence"),
            (r#"a=="\/""#, 3, "illegal escape sequence"),
            (r#"a=="\x4""#, 3, "illegal numeric escape sequence"),
            (r#"a=="\777""#, 3, "unquoting failed: quote syntax error"),
            (
                r#"a=="\U00110000""#,
                3,
                "unquoting failed: quote syntax error",
            ),
            ("a==\"\\", 3, "illegal escape sequence"),
            // NUL bytes
            ("a\0", 1, "unexpected null"),
            ("a==b\0", 4, "unexpected null"),
            ("a==\"b\0\"", 3, "unexpected null"),
        ];
        for &(input, pos, msg) in cases {
            let e = parse_err(input);
            assert_eq!(
                (e.position(), e.message()),
                (pos, msg),
                "filter {input:?}: {e}"
            );
            assert_eq!(e.input(), input);
        }
    }

    #[test]
    fn error_display() {
        let e = parse_err("a==b,,c");
        assert_eq!(
            e.to_string(),
            "filters: parse error: [a==b, >|,|< c]: expected field or quoted"
        );
        let e = parse_err("name==");
        assert_eq!(
            e.to_string(),
            "filters: parse error: [name==]: expected value or quoted"
        );
        let e = parse_err("牛==a b");
        assert_eq!(e.position(), 0);
        assert_eq!(
            e.to_string(),
            "filters: parse error: [ >|牛|< ==a b]: expected field or quoted"
        );
        let e = parse_err("a~=(x");
        assert_eq!(
            e.to_string(),
            "filters: parse error: [a~= >|(|< x]: invalid regular expression: missing closing ): `(x`"
        );
        let boxed: Box<dyn Error + Send + Sync> = Box::new(e);
        assert!(boxed.to_string().contains("missing closing )"));
    }

    #[test]
    fn regexp_errors_are_parse_errors() {
        for input in [
            "name~=(abc",
            "name~=abc)",
            "name~=[abc",
            "name~=[z-a]",
            "name~=a**",
            "name~=*a",
            r"name~=\pL",
            r#"name~="\\p{Greek}""#,
            r"name~=(?=x)",
            r"name~=\1",
            "name~=/a{2,1}/",
            "name~=a{1001}",
        ] {
            let e = parse_err(input);
            assert_eq!(e.position(), 6, "{input:?}");
            assert!(
                e.message().starts_with("invalid regular expression: "),
                "{input:?}: {e}"
            );
        }
        // Syntax errors elsewhere in the string are reported first.
        let e = parse_err("a~=(,b==c d");
        assert_eq!((e.position(), e.message()), (9, "unexpected input:  "));
        let e = parse_err("a~=(,b~=[");
        assert_eq!(
            (
                e.position(),
                e.message()
                    .starts_with("invalid regular expression: missing closing )")
            ),
            (3, true)
        );
        let long = format!("name~=\"{}\"", "a".repeat(1025));
        assert!(
            parse_err(&long)
                .message()
                .contains("longer than 1024 bytes")
        );
        assert!(parse(&format!("name~=\"{}\"", "a".repeat(1024))).is_ok());
    }

    #[test]
    fn filters_are_send_and_sync() {
        fn check<T: Send + Sync + Clone + fmt::Debug>() {}
        check::<Filter>();
        check::<FilterSet>();
        check::<FilterError>();
    }

    // --- regular expressions -------------------------------------------------------

    fn re(pattern: &str) -> pikevm::Regex {
        pikevm::Regex::new(pattern).unwrap_or_else(|e| panic!("{pattern:?}: {e}"))
    }

    #[test]
    fn regex_matching() {
        let cases: &[(&str, &str, bool)] = &[
            ("", "", true),
            ("", "abc", true),
            ("abc", "xxabcxx", true),
            ("abc", "ab", false),
            ("a.c", "abc", true),
            ("a.c", "a\nc", false),
            ("(?s)a.c", "a\nc", true),
            ("^abc", "abcd", true),
            ("^abc", "xabc", false),
            ("abc$", "xabc", true),
            ("abc$", "abc\n", false),
            ("(?m)abc$", "abc\nx", true),
            ("(?m)^x", "abc\nx", true),
            ("^x", "abc\nx", false),
            (r"\Aabc\z", "abc", true),
            (r"\Aabc\z", "abcd", false),
            ("^$", "", true),
            ("^$", "a", false),
            ("a*", "", true),
            ("^a*$", "aaaa", true),
            ("^a+$", "", false),
            ("^a+$", "aaa", true),
            ("^ab?c$", "ac", true),
            ("^ab?c$", "abc", true),
            ("^ab?c$", "abbc", false),
            ("^a{3}$", "aaa", true),
            ("^a{3}$", "aa", false),
            ("^a{2,}$", "a", false),
            ("^a{2,}$", "aaaaa", true),
            ("^a{1,2}$", "aaa", false),
            ("^a{0,2}$", "", true),
            ("^a{0}$", "", true),
            ("^(ab){2}$", "abab", true),
            ("^a{,2}$", "a{,2}", true),
            ("^a{x}$", "a{x}", true),
            ("^a{01}$", "a{01}", true),
            ("^{$", "{", true),
            ("^a*?$", "aa", true),
            ("^a+?b??$", "aab", true),
            ("^(?U)a+$", "aa", true),
            ("^(cat|dog)s?$", "dogs", true),
            ("^(cat|dog)s?$", "cow", false),
            ("cat|dog", "hotdog", true),
            ("^(a|)$", "", true),
            ("^(?:a|b)+$", "abba", true),
            ("^(?P<x>a)(?<y>b)$", "ab", true),
            ("[abc]+", "xxbxx", true),
            ("^[abc]+$", "abd", false),
            ("^[a-z0-9_-]+$", "snap-1_x", true),
            ("^[^a-z]+$", "ABC", true),
            ("^[^a-z]+$", "AbC", false),
            ("^[^a]$", "\n", true),
            ("^[]a]+$", "]a]", true),
            ("^[^]a]$", "b", true),
            ("^[a-]+$", "a-a", true),
            ("^[a-c-e]+$", "a-e", true),
            ("^[a-c-e]+$", "d", false),
            (r"^[\]\\]+$", r"]\", true),
            (r"^[\d.]+$", "1.2.3", true),
            (r"^[\D]+$", "abc", true),
            (r"^[\D]+$", "a1", false),
            ("^[[:alpha:]]+$", "abcXYZ", true),
            ("^[[:^alpha:]]+$", "123", true),
            ("^[[:xdigit:][:space:]]+$", "dead beef", true),
            ("^[[:punct:]]+$", "!-/:@[`{~", true),
            ("^[[:word:]]+$", "a_1", true),
            ("^[[x]+$", "[x[", true),
            (r"^\d+$", "0123", true),
            (r"^\d+$", "12a", false),
            (r"^\D+$", "abc", true),
            (r"^\w+$", "a_Z9", true),
            (r"^\W+$", "-+ ", true),
            (r"^a\sb$", "a\tb", true),
            (r"^a\Sb$", "a b", false),
            (r"\bfoo\b", "a foo b", true),
            (r"\bfoo\b", "afoob", false),
            (r"\Boo\B", "afoob", true),
            (
                r"^\.\*\+\?\(\)\[\]\{\}\|\^\$\\\/$",
                r".*+?()[]{}|^$\/",
                true,
            ),
            (r"^\x41\x{1F600}\101\t\n$", "A😀A\t\n", true),
            (r"^\Qa.b*\E.$", "a.b*c", true),
            (r"^\Qa.b*$", "a.b*$", true),
            (r"^\Qa.b*$", "axb*$", false),
            (r"^\Qab\E*$", "abbb", true),
            (r"^\Qab\E*$", "abab", false),
            (r"^a\Q\E*$", "aaa", true),
            (r"^\Qa", "a", true),
            ("(?i)^abc$", "AbC", true),
            ("(?i)^[a-c]+$", "ABCabc", true),
            ("(?i)^[^a-c]+$", "B", false),
            ("^(?i:a)b$", "Ab", true),
            ("^(?i:a)b$", "AB", false),
            ("^(?i)a(?-i)b$", "Ab", true),
            ("^(?i)a(?-i)b$", "AB", false),
            ("^(a(?i)b)c$", "aBc", true),
            ("^(a(?i)b)c$", "aBC", false),
            ("(?i)k", "\u{212A}", true),
            ("(?i)\u{212A}", "k", true),
            ("(?i)[k]", "\u{212A}", true),
            ("(?i)[\u{212A}]", "K", true),
            ("(?i)s", "\u{17F}", true),
            ("(?i)σ", "Σς", true),
            ("(?i)é", "É", true),
            ("(?i)i", "\u{131}", false),
            ("(?i)[I]", "\u{131}", false),
            ("(?i)[^I]", "\u{131}", true),
            ("(?i)[\u{1C5}]", "\u{1C4}", true),
            ("(?i)[\u{1C5}]", "\u{1C6}", true),
            ("(?i)[^\u{1C5}]", "\u{1C6}", false),
            ("(?i)\u{1C4}", "\u{1C5}", true),
            ("(?i)^[\\x{0}-\\x{10FFFF}]$", "K", true),
            ("(?i)^[\\D]+$", "kK\u{212A}", true),
            ("(?i)^[^\\D]$", "\u{212A}", false),
            ("(?i)^[a-\\x{2000}]$", "\u{212A}", true),
            ("(?i)^[\\x{2100}-\\x{10FFFF}]$", "k", true),
            ("(?i)^[\\x{2100}-\\x{10FFFF}]$", "j", false),
            ("牛+", "牛牛", true),
            ("^.$", "牛", true),
            ("^...$", "牛", false),
            (
                "^sha256:[a-f0-9]{64}$",
                "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
                true,
            ),
            ("^sha256:[a-f0-9]{64}$", "sha256:e3b0", false),
            ("(a*)*b", "aaab", true),
            ("(a*)+$", "b", true),
            ("(^)*a", "a", true),
            ("(|a)*b", "ab", true),
            (r"(\b)*x", "x", true),
        ];
        for &(pattern, text, want) in cases {
            assert_eq!(re(pattern).is_match(text), want, "{pattern:?} on {text:?}");
        }
    }

    #[test]
    fn regex_syntax_errors() {
        for pattern in [
            "(",
            "(a",
            "a)",
            ")",
            "[",
            "[a",
            "[]",
            "[^]",
            "[z-a]",
            "[a-\\d]",
            "*",
            "+a",
            "?",
            "a|*",
            "(*)",
            "a**",
            "a*+",
            "a+?*",
            "a{2}*",
            "a{2}{3}",
            "a{2,1}",
            "a{1001}",
            "a{1,1001}",
            "a{99999999999}",
            "\\",
            "a\\",
            r"\8",
            r"\1",
            r"\q",
            r"\é",
            r"\x",
            r"\xg0",
            r"\x{}",
            r"\x{110000}",
            r"\x{d800}",
            r"\pL",
            r"\p{Greek}",
            r"[\pL]",
            r"\C",
            "(?=a)",
            "(?!a)",
            "(?<=a)",
            "(?#c)",
            "(?P=n)",
            "(?P<>a)",
            "(?P<a-b>a)",
            "(?<n",
            "(?x)",
            "(?-)",
            "(?i-)",
            "(?i-m-s)",
            "(?",
            "[[:foo:]]",
            "[[:alpha:]",
            r"\Q\E*",
            r"\Q\E{1,3}",
        ] {
            assert!(pikevm::Regex::new(pattern).is_err(), "{pattern:?} compiled");
        }
        for pattern in [
            "(?)",
            "(?i)",
            "(?:)",
            "()",
            "a|",
            "|",
            "[[:]",
            "a{",
            "a{1",
            "a{1,",
            "^*",
            "$+",
            "(?i)(?-i)",
        ] {
            assert!(pikevm::Regex::new(pattern).is_ok(), "{pattern:?} rejected");
        }
    }

    #[test]
    fn regex_limits() {
        // Size: counted repetition is expanded, so nesting is bounded.
        assert!(pikevm::Regex::new("a{1000}").is_ok());
        assert!(pikevm::Regex::new("(a{1000}){1000}").is_err());
        assert!(pikevm::Regex::new("((((a{100}){100}){100}){100})").is_err());
        // Depth.
        let deep = format!("{}a{}", "(".repeat(150), ")".repeat(150));
        assert!(pikevm::Regex::new(&deep).is_err());
        let ok = format!("{}a{}", "(".repeat(50), ")".repeat(50));
        assert!(re(&ok).is_match("a"));
        let stacked = format!("a{}", "(?:)*".repeat(150));
        assert!(pikevm::Regex::new(&stacked).is_err() || re(&stacked).is_match("a"));
        // Length.
        assert!(pikevm::Regex::new(&"a".repeat(pikevm::MAX_PATTERN_LEN + 1)).is_err());
    }

    #[test]
    fn regex_pathological_inputs_are_fast() {
        let text = "a".repeat(20_000);
        let start = std::time::Instant::now();
        assert!(!re("(a*)*b").is_match(&text));
        assert!(!re("(a|a)*b").is_match(&text));
        assert!(!re("(a+a+)+b").is_match(&text));
        assert!(!re("^(a|aa)*c$").is_match(&text));
        assert!(re("(a|b)*a{20}$").is_match(&text));
        assert!(!re("x{100}").is_match(&text));
        assert!(start.elapsed() < std::time::Duration::from_secs(20));
    }
}
