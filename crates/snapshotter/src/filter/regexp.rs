//! Regular expressions for `~=`: containerd compiles them with Go's `regexp`
//! (RE2 syntax); here the `regex` crate matches them, after a translation
//! from Go's syntax to the crate's.
//!
//! The two dialects agree on most of the syntax and on the meaning of what
//! they share (leftmost-first semantics, simple case folding, `.` and `$`
//! without flags, flag scoping), but each accepts things the other reads
//! differently or rejects. Rather than pass the pattern through and patch
//! the differences, [`translate`] parses Go's grammar (validating it with
//! Go's rules and messages) and writes an equivalent pattern in which every
//! literal and class member is a `\x{..}` escape, so no character can mean
//! something else to the crate. Where they differ:
//!
//! | Go | `regex` crate | here |
//! |----|---------------|------|
//! | `\d \s \w \b \B` are ASCII | Unicode | written as ASCII ranges, `(?-u:\b)` |
//! | `\s` is `[\t\n\f\r ]` | also `\v` | written as Go's ranges |
//! | `\Q...\E` quotes | unsupported | each quoted character becomes a literal |
//! | `[` inside a class is literal, `&&` `--` `~~` too | nested classes and set operations | members escaped |
//! | `\<`, `\>`, `\ ` etc. are escaped punctuation | word-boundary assertions, errors | literals |
//! | `\123` octal, `\1`..`\7` alone rejected | octal off by default | decoded here |
//! | `a{`, `a{,2}`, `a{x}`, `{01}` are literal | errors or repetitions | literal `{` |
//! | `a**`, `a{2}{3}` rejected | accepted | rejected |
//! | counts above 1000 rejected | only size limits | rejected |
//! | `(?x) (?u) (?R)` rejected | flags | rejected |
//! | `(?ii)`, `(?i-i)`, `(?)` accepted | errors | normalised |
//! | `(?<1>x)` (digits first) allowed in names | rejected | groups are unnamed in the output |
//! | `\C` rejected | rejected | rejected |
//! | `\x{d800}` (surrogates) accepted, never matches | rejected | rejected (as before) |
//! | `\p{Name}`: categories, scripts, `Any`, exact case | also binary properties, loose names | names must be letters and `_`; the crate's wider set of names is accepted |
//! | a repetition after `(?i)` repeats the atom before the flags | error | the same as Go |
//!
//! Hostile patterns: the pattern is at most [`MAX_PATTERN_LEN`] bytes,
//! groups nest at most [`MAX_NESTING`] deep, counts are at most
//! [`MAX_REPEAT`]; the crate then bounds the compiled program and the lazy
//! DFA's cache ([`SIZE_LIMIT`], [`DFA_SIZE_LIMIT`]) and its own nesting, and
//! matches in time linear in the input. The translation is a single loop
//! with an explicit stack of open groups, so no pattern can exhaust the
//! call stack.

use std::fmt;

/// Longest accepted pattern, in bytes.
pub(super) const MAX_PATTERN_LEN: usize = 1024;
/// Deepest accepted nesting of groups.
pub(super) const MAX_NESTING: usize = 100;
/// Largest count in `{n,m}`, as in Go.
const MAX_REPEAT: u32 = 1000;
/// Largest compiled program the crate may build for one expression, in
/// bytes of heap. Compiling takes time in proportion, so this also bounds
/// the CPU a request can spend on compiling (tens of ms at most here).
const SIZE_LIMIT: usize = 256 << 10;
/// Largest lazy DFA cache per expression (and thread), in bytes.
const DFA_SIZE_LIMIT: usize = 1 << 20;
/// The crate's nesting limit on the translated pattern: groups, repetitions
/// and classes each add one; a repetition of a repetition adds a group too.
/// With at most [`MAX_NESTING`] groups this only stops stacked repetitions
/// like `a*\Q\E*\Q\E*...`.
const CRATE_NEST_LIMIT: u32 = 4 * MAX_NESTING as u32;

/// Why a pattern was rejected; displays like Go's message without the
/// `error parsing regexp: ` prefix.
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

/// A compiled `~=` expression.
#[derive(Debug, Clone)]
pub(super) struct Regex(regex::Regex);

impl Regex {
    /// Compiles `pattern`, written in Go's syntax.
    pub(super) fn new(pattern: &str) -> Result<Regex, RegexError> {
        let translated = translate(pattern)?;
        let re = regex::RegexBuilder::new(&translated)
            .size_limit(SIZE_LIMIT)
            .dfa_size_limit(DFA_SIZE_LIMIT)
            .nest_limit(CRATE_NEST_LIMIT)
            .build()
            .map_err(|e| match e {
                regex::Error::CompiledTooBig(_) => RegexError("expression too large".into()),
                regex::Error::Syntax(msg) if msg.contains("nest limit") => {
                    RegexError("expression nests too deeply".into())
                }
                // The translation only produces valid syntax, so what is left
                // is what it passes through: an unknown `\p{..}` name. The
                // crate's message ends with a line `error: <what>`.
                regex::Error::Syntax(msg) => RegexError(
                    msg.lines()
                        .last()
                        .map(|l| l.trim_start_matches("error: ").to_owned())
                        .unwrap_or(msg),
                ),
                other => RegexError(other.to_string()),
            })?;
        Ok(Regex(re))
    }

    /// Reports whether the expression matches anywhere in `text`.
    pub(super) fn is_match(&self, text: &str) -> bool {
        self.0.is_match(text)
    }
}

/// Translates a Go (RE2) pattern into the `regex` crate's syntax, rejecting
/// what Go rejects (and the few things listed in the module documentation).
pub(super) fn translate(pattern: &str) -> Result<String, RegexError> {
    if pattern.len() > MAX_PATTERN_LEN {
        return err(format!("expression longer than {MAX_PATTERN_LEN} bytes"));
    }
    let mut t = Translator {
        chars: pattern.chars().collect(),
        pos: 0,
        out: String::with_capacity(pattern.len() * 2),
        groups: Vec::new(),
        atom: None,
    };
    t.run()?;
    Ok(t.out)
}

/// The output text a following repetition operator applies to.
#[derive(Debug, Clone, Copy)]
struct Atom {
    /// Where it starts in the output.
    start: usize,
    /// Where it ends; only flag settings such as `(?i)` follow it.
    end: usize,
    /// Whether it is itself a repetition, which the crate would otherwise
    /// read as a lazy or stacked operator (`a*` `?`), so it needs a group.
    wrap: bool,
}

struct Translator {
    chars: Vec<char>,
    pos: usize,
    out: String,
    /// Output offset of each open group's `(`.
    groups: Vec<usize>,
    atom: Option<Atom>,
}

type RangeSet = &'static [(char, char)];

const DIGIT: RangeSet = &[('0', '9')];
const SPACE: RangeSet = &[('\t', '\n'), ('\x0C', '\r'), (' ', ' ')];
const WORD: RangeSet = &[('0', '9'), ('A', 'Z'), ('_', '_'), ('a', 'z')];

/// Go's `\d \D \s \S \w \W` (ASCII), as ranges and whether negated.
fn perl_class(c: char) -> Option<(RangeSet, bool)> {
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

/// Go's `[:name:]` classes (ASCII).
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

/// Writes `c` so that the crate reads it as that literal character, in or
/// out of a class, whatever the flags.
fn push_char(out: &mut String, c: char) {
    if c.is_ascii_alphanumeric() {
        out.push(c);
    } else {
        out.push_str(&format!("\\x{{{:X}}}", c as u32));
    }
}

/// Writes class members (without brackets) for `set`.
fn push_ranges(out: &mut String, set: &[(char, char)]) {
    for &(lo, hi) in set {
        push_char(out, lo);
        if hi != lo {
            out.push('-');
            push_char(out, hi);
        }
    }
}

/// Writes a class item for `set`, negated as a nested class: Go folds case
/// before negating each such item, as the crate does for a nested class.
fn push_class_item(out: &mut String, (set, negated): (RangeSet, bool)) {
    if negated {
        out.push_str("[^");
        push_ranges(out, set);
        out.push(']');
    } else {
        push_ranges(out, set);
    }
}

impl Translator {
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
        self.chars[start.min(self.chars.len())..end.min(self.chars.len())]
            .iter()
            .collect()
    }

    fn whole(&self) -> String {
        self.chars.iter().collect()
    }

    /// Starts a new atom at the end of the output; `emit` writes it.
    fn atom(&mut self, wrap: bool, emit: impl FnOnce(&mut String)) {
        let start = self.out.len();
        emit(&mut self.out);
        self.atom = Some(Atom {
            start,
            end: self.out.len(),
            wrap,
        });
    }

    fn literal(&mut self, c: char) {
        self.atom(false, |out| push_char(out, c));
    }

    fn run(&mut self) -> Result<(), RegexError> {
        // Start of the repetition operator just read, if the previous token
        // was one: Go rejects stacked operators such as `a**`.
        let mut last_repeat: Option<usize> = None;
        while let Some(c) = self.peek() {
            let start = self.pos;
            match c {
                '*' | '+' | '?' => {
                    self.pos += 1;
                    self.repeat(c.to_string(), start, last_repeat)?;
                    last_repeat = Some(start);
                    continue;
                }
                '{' => {
                    if let Some(op) = self.parse_braces()? {
                        self.repeat(op, start, last_repeat)?;
                        last_repeat = Some(start);
                        continue;
                    }
                    self.pos += 1;
                    self.literal('{');
                }
                '(' => {
                    self.pos += 1;
                    self.open_group(start)?;
                }
                ')' => {
                    self.pos += 1;
                    let Some(open) = self.groups.pop() else {
                        return err(format!("unexpected ): `{}`", self.whole()));
                    };
                    self.out.push(')');
                    self.atom = Some(Atom {
                        start: open,
                        end: self.out.len(),
                        wrap: false,
                    });
                }
                '|' => {
                    self.pos += 1;
                    self.out.push('|');
                    self.atom = None;
                }
                '[' => {
                    self.pos += 1;
                    self.parse_class(start)?;
                }
                // Assertions are wrapped when repeated: `^*` is valid Go.
                '^' | '$' | '.' => {
                    self.pos += 1;
                    self.atom(c != '.', |out| out.push(c));
                }
                '\\' if self.peek_at(1) == Some('Q') => {
                    // Each quoted character is its own atom, so a following
                    // `*` repeats only the last one; `\Q\E` leaves the
                    // previous atom in place, as in Go.
                    self.pos += 2;
                    while let Some(c) = self.bump() {
                        if c == '\\' && self.peek() == Some('E') {
                            self.pos += 1;
                            break;
                        }
                        self.literal(c);
                    }
                }
                '\\' => {
                    self.pos += 1;
                    self.parse_backslash(start)?;
                }
                c => {
                    self.pos += 1;
                    self.literal(c);
                }
            }
            last_repeat = None;
        }
        if !self.groups.is_empty() {
            return err(format!("missing closing ): `{}`", self.whole()));
        }
        Ok(())
    }

    /// Applies the repetition operator `op` (already consumed from `start`)
    /// to the current atom.
    fn repeat(
        &mut self,
        mut op: String,
        start: usize,
        last_repeat: Option<usize>,
    ) -> Result<(), RegexError> {
        if self.peek() == Some('?') {
            self.pos += 1;
            op.push('?');
        }
        if let Some(prev) = last_repeat {
            return err(format!(
                "invalid nested repetition operator: `{}`",
                self.text(prev, self.pos)
            ));
        }
        let Some(atom) = self.atom else {
            return err(format!(
                "missing argument to repetition operator: `{}`",
                self.text(start, self.pos)
            ));
        };
        // Flag settings between the atom and the operator move after it:
        // they are zero-width and apply from where they stand.
        let flags = self.out.split_off(atom.end);
        if atom.wrap {
            self.out.insert_str(atom.start, "(?:");
            self.out.push(')');
        }
        self.out.push_str(&op);
        let end = self.out.len();
        self.out.push_str(&flags);
        self.atom = Some(Atom {
            start: atom.start,
            end,
            wrap: true,
        });
        Ok(())
    }

    /// Parses `{n}`, `{n,}` or `{n,m}` at the current `{` and returns the
    /// operator to write. `Ok(None)` means it is not a repetition, and `{` is
    /// a literal.
    fn parse_braces(&mut self) -> Result<Option<String>, RegexError> {
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
        Ok(Some(match max {
            None => format!("{{{min},}}"),
            Some(max) if max == min => format!("{{{min}}}"),
            Some(max) => format!("{{{min},{max}}}"),
        }))
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

    /// Handles what follows `(` at `start`: a group, named group, flag group
    /// or flag setting.
    fn open_group(&mut self, start: usize) -> Result<(), RegexError> {
        if self.peek() == Some('?') {
            self.pos += 1;
            if self.peek() == Some('P') && self.peek_at(1) == Some('<') {
                self.pos += 2;
                self.parse_group_name(start)?;
            } else if self.peek() == Some('<') {
                self.pos += 1;
                self.parse_group_name(start)?;
            } else {
                let (flags, group) = self.parse_flags(start)?;
                if !group {
                    // `(?flags)` applies to the rest of the enclosing group
                    // in both dialects; it is not an atom.
                    self.out.push_str(&flags);
                    return Ok(());
                }
                return self.push_group(&flags);
            }
        }
        // Captures are irrelevant to a yes/no match: every group is written
        // as a non-capturing one.
        self.push_group("")
    }

    /// Opens a group with the flag text `flags` (`(?i)` style, or empty).
    fn push_group(&mut self, flags: &str) -> Result<(), RegexError> {
        if self.groups.len() >= MAX_NESTING {
            return err("expression nests too deeply");
        }
        self.groups.push(self.out.len());
        match flags.strip_suffix(')') {
            Some(f) => {
                self.out.push_str(f);
                self.out.push(':');
            }
            None => self.out.push_str("(?:"),
        }
        self.atom = None;
        Ok(())
    }

    fn parse_group_name(&mut self, start: usize) -> Result<(), RegexError> {
        let name_start = self.pos;
        while let Some(c) = self.bump() {
            if c == '>' {
                let name = &self.chars[name_start..self.pos - 1];
                if !name.is_empty() && name.iter().all(|&c| c == '_' || c.is_ascii_alphanumeric()) {
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

    /// Parses flags after `(?`. Returns the flags to write, as `(?flags)` or
    /// an empty string when they change nothing, and whether a group follows
    /// (`(?flags:`).
    fn parse_flags(&mut self, start: usize) -> Result<(String, bool), RegexError> {
        // Go applies the letters in order, so the last word on each flag
        // wins (`(?i-i)` clears `i`); the crate rejects repeated letters.
        let mut state: [(char, Option<bool>); 4] =
            [('i', None), ('m', None), ('s', None), ('U', None)];
        let mut negate = false;
        let mut saw_flag = false;
        while let Some(c) = self.bump() {
            match c {
                'i' | 'm' | 's' | 'U' => {
                    if let Some(slot) = state.iter_mut().find(|(f, _)| *f == c) {
                        slot.1 = Some(!negate);
                    }
                }
                '-' if !negate => {
                    negate = true;
                    saw_flag = false;
                    continue;
                }
                ':' | ')' if !negate || saw_flag => {
                    let on: String = state
                        .iter()
                        .filter(|(_, v)| *v == Some(true))
                        .map(|(f, _)| *f)
                        .collect();
                    let off: String = state
                        .iter()
                        .filter(|(_, v)| *v == Some(false))
                        .map(|(f, _)| *f)
                        .collect();
                    let flags = match (on.is_empty(), off.is_empty()) {
                        (true, true) => String::new(),
                        (_, true) => format!("(?{on})"),
                        _ => format!("(?{on}-{off})"),
                    };
                    return Ok((flags, c == ':'));
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

    /// Handles an escape outside a class; the current position is after the
    /// backslash at `start`.
    fn parse_backslash(&mut self, start: usize) -> Result<(), RegexError> {
        let Some(c) = self.peek() else {
            return err("trailing backslash at end of expression");
        };
        let look = match c {
            'A' => Some(r"\A"),
            'z' => Some(r"\z"),
            // Go's word boundaries are ASCII; the crate's ASCII boundary is
            // valid in a Unicode pattern.
            'b' => Some(r"(?-u:\b)"),
            'B' => Some(r"(?-u:\B)"),
            _ => None,
        };
        if let Some(look) = look {
            self.pos += 1;
            self.atom(true, |out| out.push_str(look));
            return Ok(());
        }
        if let Some(class) = perl_class(c) {
            self.pos += 1;
            self.atom(false, |out| {
                out.push('[');
                if class.1 {
                    out.push('^');
                }
                push_ranges(out, class.0);
                out.push(']');
            });
            return Ok(());
        }
        match c {
            'p' | 'P' => {
                let class = self.parse_unicode_class(start)?;
                self.atom(false, |out| out.push_str(&class));
                Ok(())
            }
            'C' => err(r"invalid escape sequence: `\C`"),
            _ => {
                let c = self.parse_escape(start)?;
                self.literal(c);
                Ok(())
            }
        }
    }

    /// Parses `\pX`, `\p{Name}`, `\p{^Name}` (and `\P`) whose backslash is
    /// at `start`; the current position is at the `p`. Returns the crate's
    /// spelling.
    fn parse_unicode_class(&mut self, start: usize) -> Result<String, RegexError> {
        let mut negated = self.bump() == Some('P');
        let bad = |t: &Self| {
            err(format!(
                "invalid character class range: `{}`",
                t.text(start, t.pos)
            ))
        };
        let mut name = match self.bump() {
            Some('{') => {
                let name_start = self.pos;
                loop {
                    match self.bump() {
                        Some('}') => break,
                        Some(_) => {}
                        None => return bad(self),
                    }
                }
                self.text(name_start, self.pos - 1)
            }
            Some(c) => c.to_string(),
            None => return bad(self),
        };
        if let Some(rest) = name.strip_prefix('^') {
            negated = !negated;
            name = rest.to_owned();
        }
        // Go's names are general categories, scripts and `Any`: letters and
        // underscores. The crate resolves them (and more) itself.
        if name.is_empty() || !name.chars().all(|c| c == '_' || c.is_ascii_alphabetic()) {
            return bad(self);
        }
        Ok(format!("\\{}{{{name}}}", if negated { 'P' } else { 'p' }))
    }

    /// Parses the escape whose backslash is at `start`; the current
    /// position is just after the backslash.
    fn parse_escape(&mut self, start: usize) -> Result<char, RegexError> {
        let Some(c) = self.bump() else {
            return err("trailing backslash at end of expression");
        };
        let bad = |t: &Self| {
            err(format!(
                "invalid escape sequence: `{}`",
                t.text(start, t.pos)
            ))
        };
        match c {
            // A lone `\1`..`\7` would be a backreference.
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
            // Go: any ASCII character other than a letter or digit escapes
            // itself (including `\<`, `\>` and `\ `, which the crate reads
            // differently).
            c if c.is_ascii() && !c.is_ascii_alphanumeric() => Ok(c),
            _ => bad(self),
        }
    }

    /// Parses a bracketed class at `start`; the current position is after
    /// `[`.
    fn parse_class(&mut self, start: usize) -> Result<(), RegexError> {
        let mut class = String::from("[");
        if self.peek() == Some('^') {
            self.pos += 1;
            class.push('^');
        }
        let mut first = true;
        loop {
            let Some(c) = self.peek() else {
                return err(format!(
                    "missing closing ]: `{}`",
                    self.text(start, usize::MAX)
                ));
            };
            if c == ']' && !first {
                self.pos += 1;
                break;
            }
            first = false;
            if c == '[' && self.peek_at(1) == Some(':') && self.parse_posix_class(&mut class)? {
                continue;
            }
            if c == '\\' {
                if let Some(perl) = self.peek_at(1).and_then(perl_class) {
                    self.pos += 2;
                    push_class_item(&mut class, perl);
                    continue;
                }
                if matches!(self.peek_at(1), Some('p' | 'P')) {
                    let escape = self.pos;
                    self.pos += 1;
                    let unicode = self.parse_unicode_class(escape)?;
                    class.push_str(&unicode);
                    continue;
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
            push_ranges(&mut class, &[(lo, hi)]);
        }
        class.push(']');
        self.atom(false, |out| out.push_str(&class));
        Ok(())
    }

    fn class_char(&mut self, class_start: usize) -> Result<char, RegexError> {
        match self.bump() {
            None => err(format!(
                "missing closing ]: `{}`",
                self.text(class_start, usize::MAX)
            )),
            Some('\\') => self.parse_escape(self.pos - 1),
            Some(c) => Ok(c),
        }
    }

    /// Parses `[:name:]` or `[:^name:]` at the current `[`; false if there
    /// is no closing `:]`, in which case `[` is an ordinary member.
    fn parse_posix_class(&mut self, class: &mut String) -> Result<bool, RegexError> {
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
        let Some(set) = posix_class(base) else {
            return err(format!(
                "invalid character class range: `{}`",
                self.text(self.pos, body_start + len + 2)
            ));
        };
        self.pos = body_start + len + 2;
        push_class_item(class, (set, negated));
        Ok(true)
    }
}
