//! Normalising raw identifiers (e-mail addresses, phone numbers) so that the
//! same person gets the same bytes at every party, and hashing them.
//!
//! Matching across parties works only when every party normalises the same
//! way before hashing: `" Jane.Doe@Example.COM"` and `"jane.doe@example.com"`
//! must give one hash. The rules here are the ones ad platforms document for
//! hashed customer lists (trim, lower-case e-mails; E.164 phone numbers), so
//! the output of `--hash sha256` is also what those platforms accept.

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

/// What kind of identifier a column holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Email,
    Phone,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Email => "email",
            Kind::Phone => "phone",
        }
    }
}

/// Why a raw identifier was rejected. Rows with an invalid identifier are
/// left out of the output and counted by reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Invalid {
    Missing,
    Empty,
    NoAt,
    SeveralAts,
    EmptyLocalPart,
    BadDomain,
    Whitespace,
    TooLong,
    BadCharacter,
    TooShort,
    TooManyDigits,
    NoCountryCode,
}

impl Invalid {
    pub fn describe(self) -> &'static str {
        match self {
            Invalid::Missing => "missing (NULL)",
            Invalid::Empty => "empty",
            Invalid::NoAt => "no @",
            Invalid::SeveralAts => "more than one @",
            Invalid::EmptyLocalPart => "nothing before the @",
            Invalid::BadDomain => "domain without a dot, or with an empty label",
            Invalid::Whitespace => "whitespace inside",
            Invalid::TooLong => "longer than 254 characters",
            Invalid::BadCharacter => "a character a phone number cannot have",
            Invalid::TooShort => "fewer than 8 digits with the country code",
            Invalid::TooManyDigits => "more than 15 digits (E.164's limit)",
            Invalid::NoCountryCode => "no country code and no --default-country",
        }
    }
}

/// How identifiers are normalised.
#[derive(Debug, Clone)]
pub struct Normaliser {
    pub kind: Kind,
    /// E-mail: apply provider rules (Gmail ignores dots and `+tags`; several
    /// providers ignore `+tags`). Off by default: a party that turns them on
    /// matches only parties that did too.
    pub provider_rules: bool,
    /// Phone: the country calling code of numbers written without one.
    pub default_country: Option<Country>,
}

/// A country for national phone numbers: its calling code and whether a
/// leading trunk `0` is dropped when the number is written internationally.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Country {
    pub iso: &'static str,
    pub calling_code: &'static str,
    pub drops_trunk_zero: bool,
}

/// Countries whose national numbers `--default-country` understands. (Italy,
/// San Marino and the Vatican keep their leading 0 in E.164.)
const COUNTRIES: &[(&str, &str, bool)] = &[
    ("US", "1", false), ("CA", "1", false), ("GB", "44", true), ("IE", "353", true),
    ("DE", "49", true), ("AT", "43", true), ("CH", "41", true), ("FR", "33", true),
    ("BE", "32", true), ("NL", "31", true), ("LU", "352", false), ("IT", "39", false),
    ("ES", "34", false), ("PT", "351", false), ("DK", "45", false), ("SE", "46", true),
    ("NO", "47", false), ("FI", "358", true), ("PL", "48", false), ("CZ", "420", false),
    ("SK", "421", true), ("HU", "36", false), ("RO", "40", true), ("BG", "359", true),
    ("GR", "30", false), ("HR", "385", true), ("SI", "386", true), ("EE", "372", false),
    ("LV", "371", false), ("LT", "370", false), ("MT", "356", false), ("CY", "357", false),
    ("UA", "380", true), ("TR", "90", true), ("IL", "972", true), ("AE", "971", true),
    ("SA", "966", true), ("ZA", "27", true), ("NG", "234", true), ("KE", "254", true),
    ("IN", "91", true), ("PK", "92", true), ("SG", "65", false), ("MY", "60", true),
    ("TH", "66", true), ("PH", "63", true), ("ID", "62", true), ("VN", "84", true),
    ("JP", "81", true), ("KR", "82", true), ("CN", "86", true), ("HK", "852", false),
    ("TW", "886", true), ("AU", "61", true), ("NZ", "64", true), ("BR", "55", true),
    ("MX", "52", false), ("AR", "54", true), ("CL", "56", false), ("CO", "57", false),
    ("PE", "51", true),
];

impl Country {
    /// Look up an ISO 3166-1 alpha-2 code (any case).
    pub fn from_iso(code: &str) -> Option<Country> {
        let upper = code.trim().to_ascii_uppercase();
        COUNTRIES.iter().find(|(iso, _, _)| *iso == upper).map(|&(iso, calling_code, drops_trunk_zero)| Country {
            iso,
            calling_code,
            drops_trunk_zero,
        })
    }

    /// The codes `from_iso` knows, for error messages.
    pub fn known() -> String {
        COUNTRIES.iter().map(|(iso, _, _)| *iso).collect::<Vec<_>>().join(", ")
    }
}

/// Mail providers whose addresses ignore a `+tag` in the local part.
const PLUS_TAG_PROVIDERS: &[&str] = &[
    "gmail.com", "googlemail.com", "outlook.com", "hotmail.com", "live.com", "icloud.com", "me.com",
    "protonmail.com", "proton.me", "fastmail.com",
];

impl Normaliser {
    /// Write the normalised form of `raw` into `out` (cleared first).
    pub fn normalise(&self, raw: &str, out: &mut String) -> Result<(), Invalid> {
        out.clear();
        match self.kind {
            Kind::Email => self.email(raw, out),
            Kind::Phone => self.phone(raw, out),
        }
    }

    /// Trim, lower-case, and (with provider rules) drop Gmail's dots and
    /// known providers' `+tags`.
    fn email(&self, raw: &str, out: &mut String) -> Result<(), Invalid> {
        let s = raw.trim();
        if s.is_empty() {
            return Err(Invalid::Empty);
        }
        if s.len() > 254 {
            return Err(Invalid::TooLong);
        }
        // One pass over the bytes finds what the checks below need.
        let (mut whitespace, mut at, mut ats) = (false, 0, 0);
        for (i, b) in s.bytes().enumerate() {
            whitespace |= b.is_ascii_whitespace();
            if b == b'@' {
                if ats == 0 {
                    at = i;
                }
                ats += 1;
            }
        }
        if whitespace {
            return Err(Invalid::Whitespace);
        }
        match ats {
            0 => return Err(Invalid::NoAt),
            1 => {}
            _ => return Err(Invalid::SeveralAts),
        }
        let (local, domain) = (&s[..at], &s[at + 1..]);
        if local.is_empty() {
            return Err(Invalid::EmptyLocalPart);
        }
        let d = domain.as_bytes();
        let dots = d.iter().filter(|&&b| b == b'.').count();
        if dots == 0 || d[0] == b'.' || d[d.len() - 1] == b'.' || d.windows(2).any(|w| w == b"..") {
            return Err(Invalid::BadDomain);
        }
        let start = out.len();
        push_lower(out, local);
        let mut domain_lower = String::new();
        let domain = if !d.iter().any(u8::is_ascii_uppercase) {
            domain
        } else {
            push_lower(&mut domain_lower, domain);
            &domain_lower
        };
        if self.provider_rules && PLUS_TAG_PROVIDERS.contains(&domain) {
            if let Some(plus) = out[start..].find('+') {
                out.truncate(start + plus);
            }
            if domain == "gmail.com" || domain == "googlemail.com" {
                let local: String = out[start..].chars().filter(|&c| c != '.').collect();
                out.truncate(start);
                out.push_str(&local);
                if out.len() == start {
                    return Err(Invalid::EmptyLocalPart);
                }
                out.push_str("@gmail.com");
                return Ok(());
            }
            if out.len() == start {
                return Err(Invalid::EmptyLocalPart);
            }
        }
        out.push('@');
        out.push_str(domain);
        Ok(())
    }

    /// E.164: `+`, the country calling code and the national number, digits
    /// only. Spaces, dashes, dots, slashes and parentheses are dropped; `00`
    /// starts an international number like `+`; a number without either gets
    /// the default country's code (its trunk `0` dropped where that country
    /// drops it).
    fn phone(&self, raw: &str, out: &mut String) -> Result<(), Invalid> {
        let s = raw.trim();
        if s.is_empty() {
            return Err(Invalid::Empty);
        }
        // "+49 (0)30 …": the bracketed trunk 0 is not dialled from abroad.
        let without_trunk;
        let s = if s.contains("(0)") && (s.starts_with('+') || s.starts_with("00")) {
            without_trunk = s.replace("(0)", "");
            without_trunk.as_str()
        } else {
            s
        };
        let mut digits = String::with_capacity(16);
        let mut international = false;
        for (i, c) in s.char_indices() {
            match c {
                '0'..='9' => digits.push(c),
                '+' if i == 0 => international = true,
                ' ' | '-' | '.' | '/' | '(' | ')' | '\u{a0}' => {}
                _ => return Err(Invalid::BadCharacter),
            }
        }
        if digits.is_empty() {
            return Err(Invalid::Empty);
        }
        if !international {
            if let Some(rest) = digits.strip_prefix("00") {
                digits = rest.to_string();
                international = true;
            }
        }
        out.push('+');
        if !international {
            let country = self.default_country.ok_or(Invalid::NoCountryCode)?;
            let national = if country.drops_trunk_zero {
                digits.trim_start_matches('0')
            } else if country.calling_code == "1" {
                // North American numbers written with the trunk prefix 1.
                if digits.len() == 11 {
                    digits.strip_prefix('1').unwrap_or(&digits)
                } else {
                    &digits
                }
            } else {
                &digits
            };
            out.push_str(country.calling_code);
            out.push_str(national);
        } else {
            out.push_str(&digits);
        }
        let n = out.len() - 1;
        if n > 15 {
            return Err(Invalid::TooManyDigits);
        }
        if n < 8 {
            return Err(Invalid::TooShort);
        }
        Ok(())
    }

    /// A description of the rules, kept in the output's metadata so that
    /// parties can check they normalised alike.
    pub fn describe(&self) -> String {
        match self.kind {
            Kind::Email if self.provider_rules => "email: trim, lower-case, provider rules (gmail dots, +tags)".into(),
            Kind::Email => "email: trim, lower-case".into(),
            Kind::Phone => match self.default_country {
                Some(c) => format!("phone: E.164, default country {} (+{})", c.iso, c.calling_code),
                None => "phone: E.164, no default country".into(),
            },
        }
    }
}

fn push_lower(out: &mut String, s: &str) {
    if s.is_ascii() {
        let start = out.len();
        out.push_str(s);
        out[start..].make_ascii_lowercase();
    } else {
        out.extend(s.chars().flat_map(char::to_lowercase));
    }
}

/// How a normalised identifier becomes the collaboration's join key.
#[derive(Clone)]
pub enum Hasher {
    /// HMAC-SHA256 under the collaboration key: without the key nobody can
    /// test a guessed e-mail against the data (a dictionary attack on plain
    /// hashes of e-mails is cheap).
    Hmac(Hmac<Sha256>),
    /// Plain SHA-256, the format ad platforms accept for customer-list
    /// uploads. Anyone can test a guess against it: use it only for data
    /// meant for such a platform.
    Sha256,
}

impl Hasher {
    /// A keyed hasher. The key is the collaboration's shared secret.
    pub fn hmac(key: &[u8]) -> Hasher {
        Hasher::Hmac(<Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC accepts keys of any length"))
    }

    pub fn name(&self) -> &'static str {
        match self {
            Hasher::Hmac(_) => "hmac-sha256",
            Hasher::Sha256 => "sha256",
        }
    }

    /// The 32-byte digest of `normalised`.
    pub fn digest(&self, normalised: &[u8]) -> [u8; 32] {
        match self {
            Hasher::Hmac(keyed) => {
                let mut mac = keyed.clone();
                mac.update(normalised);
                mac.finalize().into_bytes().into()
            }
            Hasher::Sha256 => Sha256::digest(normalised).into(),
        }
    }
}

/// Lower-case hex of `digest` into `out` (64 characters).
pub fn push_hex(out: &mut String, digest: &[u8; 32]) {
    out.push_str(hex_str(digest, &mut [0; 64]));
}

/// Lower-case hex of `digest`, written into `buf`.
pub fn hex_str<'a>(digest: &[u8; 32], buf: &'a mut [u8; 64]) -> &'a str {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for (pair, b) in buf.chunks_exact_mut(2).zip(digest) {
        pair[0] = HEX[(b >> 4) as usize];
        pair[1] = HEX[(b & 15) as usize];
    }
    std::str::from_utf8(buf).expect("hex digits are ASCII")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn email(raw: &str, provider_rules: bool) -> Result<String, Invalid> {
        let n = Normaliser { kind: Kind::Email, provider_rules, default_country: None };
        let mut out = String::new();
        n.normalise(raw, &mut out).map(|()| out)
    }

    fn phone(raw: &str, country: Option<&str>) -> Result<String, Invalid> {
        let n = Normaliser { kind: Kind::Phone, provider_rules: false, default_country: country.map(|c| Country::from_iso(c).unwrap()) };
        let mut out = String::new();
        n.normalise(raw, &mut out).map(|()| out)
    }

    #[test]
    fn emails_are_trimmed_and_lower_cased() {
        assert_eq!(email("  Jane.Doe+News@Example.COM \t", false).unwrap(), "jane.doe+news@example.com");
        assert_eq!(email("ÉLODIE@exemple.fr", false).unwrap(), "élodie@exemple.fr");
    }

    #[test]
    fn provider_rules_apply_only_when_asked_and_only_to_known_providers() {
        assert_eq!(email("Jane.Doe+news@GoogleMail.com", true).unwrap(), "janedoe@gmail.com");
        assert_eq!(email("jane.doe+news@outlook.com", true).unwrap(), "jane.doe@outlook.com");
        assert_eq!(email("jane.doe+news@example.com", true).unwrap(), "jane.doe+news@example.com");
        assert_eq!(email("jane.doe+news@gmail.com", false).unwrap(), "jane.doe+news@gmail.com");
        assert_eq!(email("+news@gmail.com", true), Err(Invalid::EmptyLocalPart));
    }

    #[test]
    fn malformed_emails_are_rejected_with_their_reason() {
        assert_eq!(email("", false), Err(Invalid::Empty));
        assert_eq!(email("   ", false), Err(Invalid::Empty));
        assert_eq!(email("jane.example.com", false), Err(Invalid::NoAt));
        assert_eq!(email("a@b@example.com", false), Err(Invalid::SeveralAts));
        assert_eq!(email("@example.com", false), Err(Invalid::EmptyLocalPart));
        assert_eq!(email("jane@localhost", false), Err(Invalid::BadDomain));
        assert_eq!(email("jane@example..com", false), Err(Invalid::BadDomain));
        assert_eq!(email("jane@.example.com", false), Err(Invalid::BadDomain));
        assert_eq!(email("jane@example.com.", false), Err(Invalid::BadDomain));
        assert_eq!(email("jane@", false), Err(Invalid::BadDomain));
        assert_eq!(email("a b@c@d", false), Err(Invalid::Whitespace));
        assert_eq!(email("jane doe@example.com", false), Err(Invalid::Whitespace));
        assert_eq!(email(&format!("{}@example.com", "a".repeat(250)), false), Err(Invalid::TooLong));
    }

    #[test]
    fn phones_become_e164() {
        assert_eq!(phone("+49 (0)30 1234-5678", None).unwrap(), "+493012345678");
        assert_eq!(phone("+49 30 1234 5678", None).unwrap(), "+493012345678");
        assert_eq!(phone("0049 30 12345678", None).unwrap(), "+493012345678");
        assert_eq!(phone("030 12345678", Some("de")).unwrap(), "+493012345678");
        assert_eq!(phone("(415) 555-0132", Some("US")).unwrap(), "+14155550132");
        assert_eq!(phone("1 415 555 0132", Some("US")).unwrap(), "+14155550132");
        assert_eq!(phone("06 1234 5678", Some("IT")).unwrap(), "+390612345678");
        assert_eq!(phone("07700 900123", Some("GB")).unwrap(), "+447700900123");
    }

    #[test]
    fn malformed_phones_are_rejected_with_their_reason() {
        assert_eq!(phone("030 12345678", None), Err(Invalid::NoCountryCode));
        assert_eq!(phone("+49 30 CALL-NOW", None), Err(Invalid::BadCharacter));
        assert_eq!(phone("+49 30", None), Err(Invalid::TooShort));
        assert_eq!(phone("+49 3012 3456 7890 1234", None), Err(Invalid::TooManyDigits));
        assert_eq!(phone(" - ", None), Err(Invalid::Empty));
    }

    #[test]
    fn hashes_are_hmac_or_plain_sha256_in_lower_hex() {
        let mut out = String::new();
        // RFC 4231 test case 2.
        push_hex(&mut out, &Hasher::hmac(b"Jefe").digest(b"what do ya want for nothing?"));
        assert_eq!(out, "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
        out.clear();
        push_hex(&mut out, &Hasher::Sha256.digest(b"abc"));
        assert_eq!(out, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }
}
