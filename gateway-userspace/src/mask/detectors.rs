//! Value detectors: find sensitive values in free text.
//!
//! Hand-written scanners, no regex engine: every detector but `email` needs a
//! digit, and `email` needs an `@`, so the scan is a tight loop that looks for
//! the next ASCII digit (and a `memchr` pass for `@`); text with neither costs one
//! pass over the bytes. At each run of digits the detectors are tried in a fixed
//! order (IBAN, international phone, card PAN, US SSN, NANP phone, ABA routing
//! number) and the first that validates wins; detections never overlap.
//!
//! Checksums cut false positives where the format has one: Luhn for card PANs,
//! ISO 13616 mod-97 for IBANs, the ABA weighted checksum (3-7-1) for routing
//! numbers. The trade-off is stated per detector; masking is on the side of
//! over-matching (a false positive masks a harmless number, a false negative
//! leaks PII).

use std::ops::Range;

/// A value detector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Detector {
    /// US Social Security number written `ddd-dd-dddd` or `ddd dd dddd`, with the
    /// SSA's impossible areas (000, 666, 9xx), group 00 and serial 0000 excluded.
    /// Nine bare digits are not matched (too many false positives).
    UsSsn,
    /// Payment card number: 13-19 digits, optionally grouped by single spaces or
    /// dashes, first digit 2-6, Luhn-valid.
    CardPan,
    /// E-mail address `local@domain.tld`.
    Email,
    /// Phone number: NANP with separators (`555-867-5309`, `(555) 867-5309`,
    /// `+1 555 867 5309`) or E.164 (`+` and 8-15 digits, optionally grouped).
    Phone,
    /// IBAN: country code, two check digits, 11-30 alphanumerics, optionally in
    /// groups of four; mod-97 must be 1.
    Iban,
    /// US ABA routing number: exactly nine digits, valid Federal Reserve prefix,
    /// 3-7-1 checksum. About one in ten random nine-digit numbers with a valid
    /// prefix passes; that is the cost of catching routing numbers in free text.
    AbaRouting,
}

impl Detector {
    pub const ALL: [Detector; 6] = [
        Detector::UsSsn,
        Detector::CardPan,
        Detector::Email,
        Detector::Phone,
        Detector::Iban,
        Detector::AbaRouting,
    ];

    /// The name used in policy files and audit records.
    pub fn as_str(self) -> &'static str {
        match self {
            Detector::UsSsn => "us_ssn",
            Detector::CardPan => "card_pan",
            Detector::Email => "email",
            Detector::Phone => "phone",
            Detector::Iban => "iban",
            Detector::AbaRouting => "aba_routing",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|d| d.as_str() == s)
    }

    fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

/// A set of enabled detectors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DetectorSet(u8);

impl DetectorSet {
    pub const NONE: DetectorSet = DetectorSet(0);
    pub const ALL: DetectorSet = DetectorSet(0b11_1111);

    #[must_use]
    pub fn with(self, d: Detector) -> Self {
        DetectorSet(self.0 | d.bit())
    }
    pub fn contains(self, d: Detector) -> bool {
        self.0 & d.bit() != 0
    }
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
    pub fn iter(self) -> impl Iterator<Item = Detector> {
        Detector::ALL.into_iter().filter(move |d| self.contains(*d))
    }
}

impl FromIterator<Detector> for DetectorSet {
    fn from_iter<T: IntoIterator<Item = Detector>>(iter: T) -> Self {
        iter.into_iter().fold(DetectorSet::NONE, DetectorSet::with)
    }
}

/// One detected value: which detector, and the byte range in the scanned text
/// (always on `char` boundaries: detected values are ASCII).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Detection {
    pub detector: &'static str,
    pub kind: Detector,
    pub range: Range<usize>,
}

/// Run all detectors over `text`.
pub fn scan(text: &str) -> impl Iterator<Item = Detection> {
    scan_with(text, DetectorSet::ALL).into_iter()
}

/// Run the detectors in `set` over `text`; detections in order, non-overlapping.
pub fn scan_with(text: &str, set: DetectorSet) -> Vec<Detection> {
    let b = text.as_bytes();
    let mut emails = Vec::new();
    if set.contains(Detector::Email) {
        let mut after = 0;
        for at in memchr::memchr_iter(b'@', b) {
            if at < after {
                continue;
            }
            if let Some(r) = email_at(b, at, after) {
                after = r.end;
                emails.push(Detection {
                    detector: Detector::Email.as_str(),
                    kind: Detector::Email,
                    range: r,
                });
            }
        }
    }
    let digit_set = DetectorSet(set.0 & !Detector::Email.bit());
    if digit_set.is_empty() {
        return emails;
    }
    let mut out = Vec::with_capacity(emails.len());
    let mut next_email = 0;
    let mut i = 0;
    let n = b.len();
    while i < n {
        // Prefilter: skip to the next ASCII digit.
        match b[i..].iter().position(u8::is_ascii_digit) {
            Some(off) => i += off,
            None => break,
        }
        // Skip digits inside an e-mail already found.
        while next_email < emails.len() && emails[next_email].range.end <= i {
            out.push(emails[next_email].clone());
            next_email += 1;
        }
        if next_email < emails.len() && emails[next_email].range.start <= i {
            i = emails[next_email].range.end;
            continue;
        }
        let run_end = digits_end(b, i);
        if i > 0 && b[i - 1].is_ascii_digit() {
            i = run_end;
            continue;
        }
        let limit = emails.get(next_email).map_or(n, |e| e.range.start);
        if let Some((kind, r)) = detect_at(b, i, digit_set)
            && r.end <= limit
        {
            i = r.end;
            out.push(Detection {
                detector: kind.as_str(),
                kind,
                range: r,
            });
            continue;
        }
        i = run_end;
    }
    out.extend(emails.into_iter().skip(next_email));
    out
}

fn digits_end(b: &[u8], mut i: usize) -> usize {
    while i < b.len() && b[i].is_ascii_digit() {
        i += 1;
    }
    i
}

fn is_digit_at(b: &[u8], i: usize) -> bool {
    b.get(i).is_some_and(u8::is_ascii_digit)
}

/// True when position `i` does not continue a number or word (end of text counts).
fn boundary_after(b: &[u8], i: usize) -> bool {
    !b.get(i).is_some_and(u8::is_ascii_alphanumeric)
}

fn digit_boundary_after(b: &[u8], i: usize) -> bool {
    !is_digit_at(b, i)
}

/// Try the digit-triggered detectors at `i`, the first digit of a run.
fn detect_at(b: &[u8], i: usize, set: DetectorSet) -> Option<(Detector, Range<usize>)> {
    if set.contains(Detector::Iban)
        && let Some(r) = iban_at(b, i)
    {
        return Some((Detector::Iban, r));
    }
    if set.contains(Detector::Phone)
        && let Some(r) = intl_phone_at(b, i)
    {
        return Some((Detector::Phone, r));
    }
    if set.contains(Detector::CardPan)
        && let Some(r) = card_at(b, i)
    {
        return Some((Detector::CardPan, r));
    }
    if set.contains(Detector::UsSsn)
        && let Some(r) = ssn_at(b, i)
    {
        return Some((Detector::UsSsn, r));
    }
    if set.contains(Detector::Phone)
        && let Some(r) = nanp_phone_at(b, i)
    {
        return Some((Detector::Phone, r));
    }
    if set.contains(Detector::AbaRouting)
        && let Some(r) = aba_at(b, i)
    {
        return Some((Detector::AbaRouting, r));
    }
    None
}

fn d(b: u8) -> u32 {
    u32::from(b - b'0')
}

// ---- card PAN ----------------------------------------------------------

fn luhn_ok(digits: &[u8]) -> bool {
    let mut sum = 0;
    for (k, &c) in digits.iter().rev().enumerate() {
        let mut v = d(c);
        if k % 2 == 1 {
            v *= 2;
            if v > 9 {
                v -= 9;
            }
        }
        sum += v;
    }
    sum % 10 == 0
}

fn card_at(b: &[u8], i: usize) -> Option<Range<usize>> {
    if !(b'2'..=b'6').contains(&b[i]) {
        return None;
    }
    let mut digits = [0u8; 19];
    let mut count = 0;
    // (digit count, end offset) at each point where the number could end.
    let mut ends: [(usize, usize); 20] = [(0, 0); 20];
    let mut nends = 0;
    let mut j = i;
    while j < b.len() && count < 19 {
        if b[j].is_ascii_digit() {
            digits[count] = b[j];
            count += 1;
            j += 1;
        } else if (b[j] == b' ' || b[j] == b'-') && is_digit_at(b, j + 1) && count >= 2 {
            ends[nends] = (count, j);
            nends += 1;
            j += 1;
        } else {
            break;
        }
    }
    if digit_boundary_after(b, j) {
        ends[nends] = (count, j);
        nends += 1;
    } else {
        // 20+ digits in a row: not a card number.
        return None;
    }
    for &(c, end) in ends[..nends].iter().rev() {
        if (13..=19).contains(&c) && luhn_ok(&digits[..c]) {
            return Some(i..end);
        }
    }
    None
}

// ---- US SSN ------------------------------------------------------------

fn ssn_at(b: &[u8], i: usize) -> Option<Range<usize>> {
    let s = b.get(i..i + 11)?;
    let sep = s[3];
    if !(sep == b'-' || sep == b' ') || s[6] != sep {
        return None;
    }
    let digits_ok = s[..3]
        .iter()
        .chain(&s[4..6])
        .chain(&s[7..])
        .all(u8::is_ascii_digit);
    if !digits_ok || !digit_boundary_after(b, i + 11) {
        return None;
    }
    let area = d(s[0]) * 100 + d(s[1]) * 10 + d(s[2]);
    let group = d(s[4]) * 10 + d(s[5]);
    let serial = d(s[7]) * 1000 + d(s[8]) * 100 + d(s[9]) * 10 + d(s[10]);
    if area == 0 || area == 666 || area >= 900 || group == 0 || serial == 0 {
        return None;
    }
    // `ddd-dd-dddd-...` continues into something longer (a part number).
    if b.get(i + 11) == Some(&sep) && is_digit_at(b, i + 12) {
        return None;
    }
    Some(i..i + 11)
}

// ---- phones ------------------------------------------------------------

fn nanp_ok(area: &[u8], exchange: &[u8]) -> bool {
    area[0] >= b'2' && exchange[0] >= b'2'
}

fn all_digits(s: &[u8]) -> bool {
    s.iter().all(u8::is_ascii_digit)
}

/// `ddd?ddd?dddd` with the same separator (`-`, `.`, space) at `i`.
fn nanp_body(b: &[u8], i: usize) -> Option<usize> {
    let s = b.get(i..i + 12)?;
    let sep = s[3];
    if !matches!(sep, b'-' | b'.' | b' ') || s[7] != sep {
        return None;
    }
    if !(all_digits(&s[..3])
        && all_digits(&s[4..7])
        && all_digits(&s[8..])
        && nanp_ok(&s[..3], &s[4..7]))
    {
        return None;
    }
    digit_boundary_after(b, i + 12).then_some(i + 12)
}

/// `(ddd) ddd-dddd` / `(ddd)ddd-dddd` / `(ddd) ddd dddd` with `(` at `i - 1`.
#[allow(clippy::many_single_char_names)]
fn nanp_paren(b: &[u8], i: usize) -> Option<usize> {
    if i == 0 || b[i - 1] != b'(' {
        return None;
    }
    let s = b.get(i..i + 4)?;
    if !all_digits(&s[..3]) || s[3] != b')' {
        return None;
    }
    let mut j = i + 4;
    if b.get(j) == Some(&b' ') {
        j += 1;
    }
    let t = b.get(j..j + 8)?;
    if !(all_digits(&t[..3]) && matches!(t[3], b'-' | b'.' | b' ') && all_digits(&t[4..])) {
        return None;
    }
    if !nanp_ok(&s[..3], &t[..3]) || !digit_boundary_after(b, j + 8) {
        return None;
    }
    Some(j + 8)
}

fn nanp_phone_at(b: &[u8], i: usize) -> Option<Range<usize>> {
    if let Some(end) = nanp_paren(b, i) {
        let mut start = i - 1;
        // "+1 (555) ..." / "1 (555) ..."
        if start >= 2 && b[start - 1] == b' ' && b[start - 2] == b'1' {
            start -= 2;
            if start >= 1 && b[start - 1] == b'+' {
                start -= 1;
            }
        }
        return Some(start..end);
    }
    // "1-555-867-5309"
    if b[i] == b'1'
        && matches!(b.get(i + 1), Some(b'-' | b'.' | b' '))
        && let Some(end) = nanp_body(b, i + 2)
    {
        return Some(i..end);
    }
    nanp_body(b, i).map(|end| i..end)
}

/// `+` at `i - 1`: "+1 555 867 5309", "+44 20 7946 0958", "+4915112345678".
fn intl_phone_at(b: &[u8], i: usize) -> Option<Range<usize>> {
    if i == 0 || b[i - 1] != b'+' || (i >= 2 && b[i - 2].is_ascii_alphanumeric()) {
        return None;
    }
    if b[i] == b'1' && matches!(b.get(i + 1), Some(b' ' | b'-' | b'.')) {
        if let Some(end) = nanp_body(b, i + 2) {
            return Some(i - 1..end);
        }
        if b.get(i + 2) == Some(&b'(')
            && let Some(end) = nanp_paren(b, i + 3)
        {
            return Some(i - 1..end);
        }
    }
    let mut count = 0;
    let mut j = i;
    let mut end = i;
    while j < b.len() && count < 16 {
        if b[j].is_ascii_digit() {
            count += 1;
            j += 1;
            end = j;
        } else if matches!(b[j], b' ' | b'-') && is_digit_at(b, j + 1) {
            j += 1;
        } else {
            break;
        }
    }
    ((8..=15).contains(&count) && digit_boundary_after(b, end)).then_some(i - 1..end)
}

// ---- IBAN --------------------------------------------------------------

/// `i` is the first check digit; the country code is at `i - 2`.
fn iban_at(b: &[u8], i: usize) -> Option<Range<usize>> {
    if i < 2 || !b[i - 2].is_ascii_uppercase() || !b[i - 1].is_ascii_uppercase() {
        return None;
    }
    if i >= 3 && b[i - 3].is_ascii_alphanumeric() {
        return None;
    }
    let start = i - 2;
    if !is_digit_at(b, i + 1) {
        return None;
    }
    // Collect up to 34 alphanumerics, single spaces allowed between groups.
    let mut chars = [0u8; 34];
    let mut count = 0;
    let mut ends: [(usize, usize); 36] = [(0, 0); 36];
    let mut nends = 0;
    let mut j = start;
    while j < b.len() && count < 34 {
        let c = b[j];
        if c.is_ascii_digit() || c.is_ascii_uppercase() {
            chars[count] = c;
            count += 1;
            j += 1;
        } else if c == b' '
            && count >= 4
            && b.get(j + 1)
                .is_some_and(|n| n.is_ascii_digit() || n.is_ascii_uppercase())
        {
            ends[nends] = (count, j);
            nends += 1;
            j += 1;
        } else {
            break;
        }
    }
    if boundary_after(b, j) {
        ends[nends] = (count, j);
        nends += 1;
    }
    for &(c, end) in ends[..nends].iter().rev() {
        if (15..=34).contains(&c) && iban_mod97(&chars[..c]) {
            return Some(start..end);
        }
    }
    None
}

fn iban_mod97(chars: &[u8]) -> bool {
    let mut rem: u32 = 0;
    for &c in chars[4..].iter().chain(&chars[..4]) {
        if c.is_ascii_digit() {
            rem = (rem * 10 + d(c)) % 97;
        } else {
            let v = u32::from(c - b'A') + 10;
            rem = (rem * 100 + v) % 97;
        }
    }
    rem == 1
}

// ---- ABA routing number ------------------------------------------------

fn aba_at(b: &[u8], i: usize) -> Option<Range<usize>> {
    let s = b.get(i..i + 9)?;
    if !all_digits(s) || !digit_boundary_after(b, i + 9) {
        return None;
    }
    let prefix = d(s[0]) * 10 + d(s[1]);
    if !matches!(prefix, 0..=12 | 21..=32 | 61..=72 | 80) {
        return None;
    }
    let sum = 3 * (d(s[0]) + d(s[3]) + d(s[6]))
        + 7 * (d(s[1]) + d(s[4]) + d(s[7]))
        + (d(s[2]) + d(s[5]) + d(s[8]));
    (sum.is_multiple_of(10) && sum != 0).then_some(i..i + 9)
}

// ---- e-mail ------------------------------------------------------------

fn is_local_char(c: u8) -> bool {
    c.is_ascii_alphanumeric() || b".!#$%&'*+/=?^_`{|}~-".contains(&c)
}

/// The e-mail address around the `@` at `at`, its local part starting no
/// earlier than `floor` (the end of the previous address: detections never
/// overlap, so `a@b.cc@d.ee` is one address, not two sharing `b.cc`).
fn email_at(b: &[u8], at: usize, floor: usize) -> Option<Range<usize>> {
    let mut start = at;
    while start > floor && at - start < 64 && is_local_char(b[start - 1]) {
        start -= 1;
    }
    while start < at && b[start] == b'.' {
        start += 1;
    }
    if start == at {
        return None;
    }
    let mut end = at + 1;
    while end < b.len()
        && end - at <= 253
        && (b[end].is_ascii_alphanumeric() || b[end] == b'.' || b[end] == b'-')
    {
        end += 1;
    }
    while end > at + 1 && matches!(b[end - 1], b'.' | b'-') {
        end -= 1;
    }
    let domain = &b[at + 1..end];
    let last_dot = domain.iter().rposition(|&c| c == b'.')?;
    let tld = &domain[last_dot + 1..];
    if last_dot == 0
        || tld.len() < 2
        || !tld.iter().all(u8::is_ascii_alphabetic)
        || domain.windows(2).any(|w| w == b"..")
    {
        return None;
    }
    Some(start..end)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn found(text: &str) -> Vec<(&'static str, &str)> {
        scan(text).map(|d| (d.detector, &text[d.range])).collect()
    }

    #[test]
    fn chained_addresses_do_not_overlap() {
        // Found by the http_glue fuzz target: the second `@` took the first
        // address's domain as its local part, and masking sliced backwards.
        let text = "x@y.examx@y.example";
        let hits = scan_with(text, DetectorSet::ALL);
        assert_eq!(found(text), vec![("email", "x@y.examx")]);
        assert!(hits.windows(2).all(|w| w[0].range.end <= w[1].range.start));
    }

    #[test]
    fn ssn() {
        assert_eq!(found("ssn 123-45-6789."), vec![("us_ssn", "123-45-6789")]);
        assert_eq!(found("ssn 123 45 6789"), vec![("us_ssn", "123 45 6789")]);
        assert!(found("000-12-3456 666-12-3456 900-12-3456 123-00-4567 123-45-0000").is_empty());
        assert!(found("part 123-45-6789-01").is_empty());
        assert!(found("123456789").iter().all(|(k, _)| *k != "us_ssn"));
    }

    #[test]
    fn card_pan_with_luhn() {
        assert_eq!(
            found("pan 4111111111111111 ok"),
            vec![("card_pan", "4111111111111111")]
        );
        assert_eq!(
            found("4111 1111 1111 1111"),
            vec![("card_pan", "4111 1111 1111 1111")]
        );
        assert_eq!(
            found("4111-1111-1111-1111"),
            vec![("card_pan", "4111-1111-1111-1111")]
        );
        assert_eq!(
            found("amex 378282246310005"),
            vec![("card_pan", "378282246310005")]
        );
        // Luhn fails
        assert!(found("4111111111111112").is_empty());
        // trailing group that is not part of the card
        assert_eq!(
            found("card 4111 1111 1111 1111 7"),
            vec![("card_pan", "4111 1111 1111 1111")]
        );
        // too long a digit run
        assert!(found("41111111111111111111111").is_empty());
    }

    #[test]
    fn email() {
        assert_eq!(
            found("mail jane.doe+x@example.co.uk, please"),
            vec![("email", "jane.doe+x@example.co.uk")]
        );
        assert!(found("user@localhost and @handle and a@b.c1").is_empty());
        assert_eq!(
            found("id 123456789@bank.com"),
            vec![("email", "123456789@bank.com")]
        );
    }

    #[test]
    fn phone() {
        assert_eq!(found("call 555-867-5309"), vec![("phone", "555-867-5309")]);
        assert_eq!(
            found("call (555) 867-5309 now"),
            vec![("phone", "(555) 867-5309")]
        );
        assert_eq!(
            found("call +1 (555) 867-5309"),
            vec![("phone", "+1 (555) 867-5309")]
        );
        assert_eq!(
            found("call +1 555 867 5309"),
            vec![("phone", "+1 555 867 5309")]
        );
        assert_eq!(
            found("ring +44 20 7946 0958"),
            vec![("phone", "+44 20 7946 0958")]
        );
        assert_eq!(found("1-800-555-0199"), vec![("phone", "1-800-555-0199")]);
        // exchange starting with 1 is not NANP
        assert!(found("555-123-4567").is_empty());
    }

    #[test]
    fn iban() {
        assert_eq!(
            found("IBAN DE89370400440532013000."),
            vec![("iban", "DE89370400440532013000")]
        );
        assert_eq!(
            found("to GB82 WEST 1234 5698 7654 32 today"),
            vec![("iban", "GB82 WEST 1234 5698 7654 32")]
        );
        assert!(
            found("DE89370400440532013001")
                .iter()
                .all(|(k, _)| *k != "iban")
        );
    }

    #[test]
    fn aba() {
        assert_eq!(
            found("routing 021000021"),
            vec![("aba_routing", "021000021")]
        );
        assert_eq!(
            found("routing 011000015"),
            vec![("aba_routing", "011000015")]
        );
        assert!(found("021000022").is_empty());
        assert!(found("991000021").is_empty());
    }

    #[test]
    fn mixed_and_plain_text() {
        let t = "Jane (jane@ex.com, SSN 123-45-6789) paid with 5555555555554444; order 12345.";
        assert_eq!(
            found(t),
            vec![
                ("email", "jane@ex.com"),
                ("us_ssn", "123-45-6789"),
                ("card_pan", "5555555555554444")
            ]
        );
        assert!(found("no sensitive values in here at all").is_empty());
        assert!(found("").is_empty());
        assert!(found("héllo 123-45-6789 wörld").len() == 1);
    }

    #[test]
    fn subsets() {
        let set: DetectorSet = [Detector::Email].into_iter().collect();
        let t = "a@b.co 123-45-6789";
        let v: Vec<_> = scan_with(t, set).into_iter().map(|d| d.detector).collect();
        assert_eq!(v, vec!["email"]);
    }
}
