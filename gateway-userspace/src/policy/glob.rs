//! Minimal globs for names in policy files: `*` matches any run of characters
//! (including none, and including `/` and `.`), `?` exactly one character;
//! everything else matches itself. No character classes, no escapes: names in
//! policies do not need them, and a smaller language is easier to audit.

use std::fmt;

#[derive(Clone, PartialEq, Eq)]
pub struct Glob {
    pattern: Vec<char>,
    source: String,
    case_insensitive: bool,
    literal: bool,
}

impl Glob {
    pub fn new(pattern: &str) -> Self {
        Self::build(pattern, false)
    }

    /// For SQL names: compared without regard to ASCII case.
    pub fn new_case_insensitive(pattern: &str) -> Self {
        Self::build(pattern, true)
    }

    fn build(pattern: &str, case_insensitive: bool) -> Self {
        let p = if case_insensitive {
            pattern.to_lowercase()
        } else {
            pattern.to_owned()
        };
        Glob {
            literal: !p.contains(['*', '?']),
            pattern: p.chars().collect(),
            source: pattern.to_owned(),
            case_insensitive,
        }
    }

    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// True when the pattern has no wildcard.
    pub fn is_literal(&self) -> bool {
        self.literal
    }

    /// True for the pattern `*` alone.
    pub fn is_match_all(&self) -> bool {
        self.pattern == ['*']
    }

    pub fn matches(&self, s: &str) -> bool {
        if self.case_insensitive && s.chars().any(char::is_uppercase) {
            self.matches_chars(&s.to_lowercase().chars().collect::<Vec<_>>())
        } else if self.literal {
            self.source.len() == s.len() && self.pattern.iter().copied().eq(s.chars())
        } else {
            self.matches_chars(&s.chars().collect::<Vec<_>>())
        }
    }

    fn matches_chars(&self, s: &[char]) -> bool {
        // Iterative wildcard match with single-star backtracking: O(len(p) * len(s)).
        let p = &self.pattern;
        let (mut pi, mut si) = (0, 0);
        let mut star: Option<(usize, usize)> = None;
        while si < s.len() {
            if pi < p.len() && (p[pi] == '?' || p[pi] == s[si]) {
                pi += 1;
                si += 1;
            } else if pi < p.len() && p[pi] == '*' {
                star = Some((pi, si));
                pi += 1;
            } else if let Some((sp, ss)) = star {
                pi = sp + 1;
                si = ss + 1;
                star = Some((sp, ss + 1));
            } else {
                return false;
            }
        }
        p[pi..].iter().all(|&c| c == '*')
    }
}

impl fmt::Debug for Glob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Glob({:?})", self.source)
    }
}

#[cfg(test)]
mod tests {
    use super::Glob;

    #[test]
    fn wildcards() {
        assert!(Glob::new("*").matches(""));
        assert!(Glob::new("/sys/fs/cgroup/agents/*").matches("/sys/fs/cgroup/agents/a/b.scope"));
        assert!(!Glob::new("/sys/fs/cgroup/agents/*").matches("/sys/fs/cgroup/other"));
        assert!(Glob::new("card_*").matches("card_number"));
        assert!(Glob::new("a?c").matches("abc"));
        assert!(!Glob::new("a?c").matches("ac"));
        assert!(Glob::new("*a*b*").matches("xxaxxbxx"));
        assert!(!Glob::new("*a*b").matches("xxaxxbxxc"));
        assert!(Glob::new("demo").matches("demo"));
        assert!(!Glob::new("demo").matches("Demo"));
        assert!(Glob::new_case_insensitive("Customers").matches("CUSTOMERS"));
    }
}
