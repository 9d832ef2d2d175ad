//! Reading the file schema with every error reported, in words a person understands.
//!
//! serde stops at the first error, so a file with five typos would take five runs of `writegate
//! check`. After each error the line it points at is blanked (spaces of the same length, so that
//! positions hold) and the file read again, until it reads or an error cannot be got past: a
//! missing field, or a blanked line that held part of a multi-line value. Rule checks run only on
//! a file that read without blanking (a blanked option's default would raise errors of its own).

use std::ops::Range;

use super::error::ErrorSink;
use super::file::FileConfig;

/// Schema errors reported from one file at most.
const MAX_SCHEMA_ERRORS: usize = 50;

/// The file schema, or `None` with every schema error in `sink`.
pub(super) fn read(text: &str, sink: &mut ErrorSink<'_>) -> Option<FileConfig> {
    let mut work = text.to_string();
    for blanked in 0..MAX_SCHEMA_ERRORS {
        let error = match toml::from_str::<FileConfig>(&work) {
            Ok(file) if blanked == 0 => return Some(file),
            Ok(_) => return None,
            Err(error) => error,
        };
        // A syntax error that blanking made is not the file's: stop there.
        if blanked > 0 && work.parse::<toml::Table>().is_err() {
            return None;
        }
        let span = error.span().unwrap_or(0..0);
        let line = line_of(&work, span.start);
        let message = humanize(error.message(), key_on(&work[line.clone()]));
        sink.at(span, message);
        let missing = error.message().starts_with("missing field");
        if missing || work.parse::<toml::Table>().is_err() || work[line.clone()].trim().is_empty() {
            return None;
        }
        let spaces = " ".repeat(line.len());
        work.replace_range(line, &spaces);
    }
    None
}

/// The byte range of the line holding `offset`, without its line end.
fn line_of(text: &str, offset: usize) -> Range<usize> {
    let offset = offset.min(text.len());
    let start = text[..offset].rfind('\n').map_or(0, |i| i + 1);
    let end = text[offset..].find('\n').map_or(text.len(), |i| offset + i);
    start..end
}

/// The key a `key = value` line sets, if it is one.
fn key_on(line: &str) -> Option<&str> {
    let (key, _) = line.split_once('=')?;
    let key = key.trim().trim_matches('"');
    (!key.is_empty() && !key.starts_with('[')).then_some(key)
}

/// serde's message, said for a person: what the option wants, what was found, and for an unknown
/// name the nearest known one.
pub(super) fn humanize(message: &str, key: Option<&str>) -> String {
    let message = &message.split_whitespace().collect::<Vec<_>>().join(" ");
    let key_text = key.map_or_else(String::new, |k| format!("`{k}` "));
    if let Some(rest) = message.strip_prefix("invalid type: ") {
        if let Some((found, expected)) = rest.split_once(", expected ") {
            let mut text = format!("{key_text}wants {}, not {found}", wanted(expected));
            if let Some(unquoted) = quoted_number(found) {
                text.push_str(&format!(" (write {unquoted} without quotes)"));
            }
            return text;
        }
    }
    if let Some(rest) = message.strip_prefix("unknown field ") {
        let (name, known) = name_and_choices(rest);
        return match nearest(name, &known) {
            Some(near) => format!("unknown option `{name}`; did you mean `{near}`?"),
            None => format!("unknown option `{name}` here (known: {})", known.join(", ")),
        };
    }
    if let Some(rest) = message.strip_prefix("unknown variant ") {
        let (name, known) = name_and_choices(rest);
        let choices = known.join(", ");
        return match nearest(name, &known) {
            Some(near) => {
                format!("{key_text}cannot be `{name}`; did you mean `{near}`? (one of: {choices})")
            }
            None => format!("{key_text}cannot be `{name}` (one of: {choices})"),
        };
    }
    if message == "duplicate key" {
        return match key {
            Some(k) => format!("`{k}` is set twice in this table"),
            None => "a key is set twice in this table".to_string(),
        };
    }
    if let Some(rest) = message.strip_prefix("missing field ") {
        return format!("required option {rest} is missing");
    }
    message.to_string()
}

/// What a serde type name asks for, in words.
fn wanted(expected: &str) -> &str {
    match expected {
        "i64" | "u64" | "i32" | "u32" | "u16" | "u8" | "usize" => "a whole number",
        "f64" | "f32" => "a number",
        "a boolean" => "true or false",
        "a string" => "a string in quotes",
        "a sequence" => "a list in [ ]",
        other => other,
    }
}

/// `2` for a found value `string "2"`.
fn quoted_number(found: &str) -> Option<&str> {
    let inner = found.strip_prefix("string \"")?.strip_suffix('"')?;
    inner.parse::<f64>().is_ok().then_some(inner)
}

/// The name and the choices of "`x`, expected one of `a`, `b`" (or "expected `a` or `b`").
fn name_and_choices(rest: &str) -> (&str, Vec<&str>) {
    let mut names = rest.split('`').skip(1).step_by(2);
    let name = names.next().unwrap_or_default();
    (name, names.collect())
}

/// The known name closest to `name`, when it is close enough to be a typo.
fn nearest<'k>(name: &str, known: &[&'k str]) -> Option<&'k str> {
    known
        .iter()
        .map(|k| (distance(name, k), *k))
        .filter(|(d, k)| *d <= (k.len() / 3).max(1))
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

/// Levenshtein distance, by characters.
fn distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut previous = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let next = (previous + usize::from(ca != *cb))
                .min(row[j] + 1)
                .min(row[j + 1] + 1);
            previous = row[j + 1];
            row[j + 1] = next;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_say_what_the_option_wants() {
        assert_eq!(
            humanize("invalid type: string \"2\", expected i64", Some("retries")),
            "`retries` wants a whole number, not string \"2\" (write 2 without quotes)"
        );
        assert_eq!(
            humanize(
                "unknown field `retriez`, expected one of `name`, `retries`",
                None
            ),
            "unknown option `retriez`; did you mean `retries`?"
        );
        assert_eq!(
            humanize(
                "unknown variant `consistant_hash`, expected `least_conn` or `consistent_hash`",
                Some("balance")
            ),
            "`balance` cannot be `consistant_hash`; did you mean `consistent_hash`? (one of: least_conn, consistent_hash)"
        );
        assert_eq!(
            humanize("duplicate key", Some("access_log")),
            "`access_log` is set twice in this table"
        );
        assert_eq!(distance("kitten", "sitting"), 3);
        assert_eq!(nearest("zzz", &["name", "retries"]), None);
    }
}
