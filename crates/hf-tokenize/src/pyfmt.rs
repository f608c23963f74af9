//! Python's text forms of template values, so a rendered chat template matches the bytes that
//! Jinja2 under Hugging Face `transformers` produces: `json.dumps` (the `tojson` filter that
//! `transformers/utils/chat_template_utils.py` installs: `ensure_ascii=False`, default separators
//! `", "` and `": "`, keys in insertion order), `repr()` of a value printed with `{{ }}` (`None`,
//! `True`, `['a', 1]`), float `repr`, and `datetime.strftime` for `strftime_now`.

use std::fmt::Write;

use minijinja::value::{Value, ValueKind};

/// Options of Python's `json.dumps` that `tojson` exposes.
#[derive(Debug, Clone)]
pub(crate) struct JsonOptions {
    pub ensure_ascii: bool,
    /// `None`: one line. `Some(s)`: newline and `s` repeated per level.
    pub indent: Option<String>,
    pub item_sep: String,
    pub key_sep: String,
    pub sort_keys: bool,
}

impl Default for JsonOptions {
    fn default() -> Self {
        Self {
            ensure_ascii: false,
            indent: None,
            item_sep: ", ".into(),
            key_sep: ": ".into(),
            sort_keys: false,
        }
    }
}

/// Why a value has no JSON form (Python raises `TypeError` for these).
#[derive(Debug)]
pub(crate) struct NotJson(pub String);

/// `json.dumps(value, ...)`.
pub(crate) fn json_dumps(value: &Value, opts: &JsonOptions) -> Result<String, NotJson> {
    let mut out = String::new();
    dump(value, opts, 0, &mut out)?;
    Ok(out)
}

fn newline(opts: &JsonOptions, level: usize, out: &mut String) {
    if let Some(ind) = &opts.indent {
        out.push('\n');
        for _ in 0..level {
            out.push_str(ind);
        }
    }
}

fn dump(v: &Value, opts: &JsonOptions, level: usize, out: &mut String) -> Result<(), NotJson> {
    match v.kind() {
        ValueKind::None | ValueKind::Undefined => out.push_str("null"),
        ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        ValueKind::Number => out.push_str(&number_repr(v, true)),
        ValueKind::String => json_string(v.as_str().unwrap_or_default(), opts.ensure_ascii, out),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = v.try_iter().map_err(|e| NotJson(e.to_string()))?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep(opts));
                }
                newline(opts, level + 1, out);
                dump(item, opts, level + 1, out)?;
            }
            newline(opts, level, out);
            out.push(']');
        }
        ValueKind::Map => {
            let mut keys: Vec<Value> = v.try_iter().map_err(|e| NotJson(e.to_string()))?.collect();
            if keys.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            if opts.sort_keys {
                keys.sort();
            }
            out.push('{');
            for (i, key) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep(opts));
                }
                newline(opts, level + 1, out);
                let key_text = match key.kind() {
                    ValueKind::String => key.as_str().unwrap_or_default().to_string(),
                    ValueKind::None => "null".into(),
                    ValueKind::Bool => (if key.is_true() { "true" } else { "false" }).into(),
                    ValueKind::Number => number_repr(key, true),
                    _ => {
                        return Err(NotJson(format!(
                            "keys must be str, int, float, bool or None, not {key}"
                        )))
                    }
                };
                json_string(&key_text, opts.ensure_ascii, out);
                out.push_str(&opts.key_sep);
                let item = v.get_item(key).map_err(|e| NotJson(e.to_string()))?;
                dump(&item, opts, level + 1, out)?;
            }
            newline(opts, level, out);
            out.push('}');
        }
        _ => {
            return Err(NotJson(format!(
                "Object of type {} is not JSON serializable",
                v.kind()
            )))
        }
    }
    Ok(())
}

/// With an indent, Python's default item separator drops its trailing space.
fn item_sep(opts: &JsonOptions) -> &str {
    if opts.indent.is_some() && opts.item_sep == ", " {
        ","
    } else {
        &opts.item_sep
    }
}

fn json_string(s: &str, ensure_ascii: bool, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 || (ensure_ascii && (c as u32) > 0x7e) => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// An integer as is; a float as Python's `repr` (`1.0`, `1e+16`, `1.5e-05`); `json` spells
/// the non-finite ones `NaN`/`Infinity`, `repr` `nan`/`inf`.
fn number_repr(v: &Value, json: bool) -> String {
    if v.is_integer() {
        return v.to_string();
    }
    let x = f64::try_from(v.clone()).unwrap_or(f64::NAN);
    if x.is_nan() {
        return (if json { "NaN" } else { "nan" }).into();
    }
    if x.is_infinite() {
        let s = if json { "Infinity" } else { "inf" };
        return if x < 0.0 { format!("-{s}") } else { s.into() };
    }
    float_repr(x)
}

/// Python's `repr(float)`: the shortest round-trip digits, positional when the decimal exponent
/// is in -4..16, else scientific with a signed two-digit-minimum exponent.
pub(crate) fn float_repr(x: f64) -> String {
    let sci = format!("{x:e}"); // e.g. "-1.5e16", "1e-5"
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    if (-4..16).contains(&exp) {
        let s = format!("{x}");
        if s.contains('.') {
            s
        } else {
            format!("{s}.0")
        }
    } else {
        let sign = if exp < 0 { '-' } else { '+' };
        format!("{mantissa}e{sign}{:02}", exp.abs())
    }
}

/// What Jinja2 prints for `{{ value }}`: `str(value)` in Python.
pub(crate) fn py_str(v: &Value, out: &mut String) {
    match v.kind() {
        ValueKind::Undefined => {}
        ValueKind::String => out.push_str(v.as_str().unwrap_or_default()),
        _ => py_repr(v, out),
    }
}

/// Python's `repr()` of a JSON-like value.
pub(crate) fn py_repr(v: &Value, out: &mut String) {
    match v.kind() {
        ValueKind::Undefined => {}
        ValueKind::None => out.push_str("None"),
        ValueKind::Bool => out.push_str(if v.is_true() { "True" } else { "False" }),
        ValueKind::Number => out.push_str(&number_repr(v, false)),
        ValueKind::String => str_repr(v.as_str().unwrap_or_default(), out),
        ValueKind::Seq => {
            out.push('[');
            if let Ok(items) = v.try_iter() {
                for (i, item) in items.enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    py_repr(&item, out);
                }
            }
            out.push(']');
        }
        ValueKind::Map => {
            out.push('{');
            if let Ok(keys) = v.try_iter() {
                for (i, key) in keys.enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    py_repr(&key, out);
                    out.push_str(": ");
                    py_repr(&v.get_item(&key).unwrap_or_default(), out);
                }
            }
            out.push('}');
        }
        _ => {
            let _ = write!(out, "{v}");
        }
    }
}

/// Python's `repr(str)`: single quotes unless the text has `'` and no `"`.
fn str_repr(s: &str, out: &mut String) {
    let quote = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push(quote);
}

/// A civil (proleptic Gregorian, UTC) date and time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Civil {
    pub year: i64,
    pub month: u32,
    pub day: u32,
    pub hour: u32,
    pub minute: u32,
    pub second: u32,
    /// 0 = Monday, as Python's `weekday()`.
    pub weekday: u32,
    /// 1..=366
    pub yday: u32,
}

impl Civil {
    /// The UTC date and time `secs` seconds after 1970-01-01T00:00:00Z.
    pub(crate) fn from_unix(secs: i64) -> Civil {
        let days = secs.div_euclid(86_400);
        let rem = secs.rem_euclid(86_400);
        // Howard Hinnant's days-to-civil algorithm.
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z.rem_euclid(146_097);
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
        let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
        let year = yoe + era * 400 + i64::from(month <= 2);
        let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
        const CUM: [u32; 12] = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
        let yday = CUM[(month - 1) as usize] + day + u32::from(leap && month > 2);
        Civil {
            year,
            month,
            day,
            hour: (rem / 3600) as u32,
            minute: (rem / 60 % 60) as u32,
            second: (rem % 60) as u32,
            weekday: (days + 3).rem_euclid(7) as u32, // 1970-01-01 was a Thursday
            yday,
        }
    }
}

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const DAYS: [&str; 7] = [
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
];

/// Python's `datetime.strftime` in the C locale for the directives chat templates use; an
/// unknown directive is copied as is (as glibc does).
pub(crate) fn strftime(t: &Civil, fmt: &str) -> String {
    let mut out = String::new();
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let Some(d) = chars.next() else {
            out.push('%');
            break;
        };
        let month = MONTHS[(t.month - 1) as usize];
        let day = DAYS[t.weekday as usize];
        let hour12 = if t.hour % 12 == 0 { 12 } else { t.hour % 12 };
        let _ = match d {
            'Y' => write!(out, "{}", t.year),
            'y' => write!(out, "{:02}", t.year.rem_euclid(100)),
            'm' => write!(out, "{:02}", t.month),
            'd' => write!(out, "{:02}", t.day),
            'e' => write!(out, "{:2}", t.day),
            'B' => write!(out, "{month}"),
            'b' | 'h' => write!(out, "{}", &month[..3]),
            'A' => write!(out, "{day}"),
            'a' => write!(out, "{}", &day[..3]),
            'H' => write!(out, "{:02}", t.hour),
            'I' => write!(out, "{hour12:02}"),
            'M' => write!(out, "{:02}", t.minute),
            'S' => write!(out, "{:02}", t.second),
            'p' => write!(out, "{}", if t.hour < 12 { "AM" } else { "PM" }),
            'j' => write!(out, "{:03}", t.yday),
            'w' => write!(out, "{}", (t.weekday + 1) % 7),
            'u' => write!(out, "{}", t.weekday + 1),
            'F' => write!(out, "{}-{:02}-{:02}", t.year, t.month, t.day),
            'T' => write!(out, "{:02}:{:02}:{:02}", t.hour, t.minute, t.second),
            'D' => write!(
                out,
                "{:02}/{:02}/{:02}",
                t.month,
                t.day,
                t.year.rem_euclid(100)
            ),
            'Z' => write!(out, "UTC"),
            'z' => write!(out, "+0000"),
            '%' => write!(out, "%"),
            other => write!(out, "%{other}"),
        };
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dumps(json: &str) -> String {
        let v: serde_json::Value = serde_json::from_str(json).expect("test json");
        json_dumps(&crate::messages::to_value(&v), &JsonOptions::default()).expect("dumps")
    }

    #[test]
    fn json_dumps_matches_python_defaults() {
        assert_eq!(
            dumps(r#"{"b": 1, "a": [true, null, 1.5, "é\n\"x\""]}"#),
            r#"{"b": 1, "a": [true, null, 1.5, "é\n\"x\""]}"#
        );
        assert_eq!(dumps("{}"), "{}");
        assert_eq!(dumps("[]"), "[]");
        assert_eq!(dumps(r#""\u0001<&>""#), r#""\u0001<&>""#);
    }

    #[test]
    fn json_dumps_indent_and_ascii() {
        let v = crate::messages::to_value(&serde_json::json!({"a": [1, "ü😀"]}));
        let opts = JsonOptions {
            ensure_ascii: true,
            indent: Some("  ".into()),
            ..JsonOptions::default()
        };
        assert_eq!(
            json_dumps(&v, &opts).expect("dumps"),
            "{\n  \"a\": [\n    1,\n    \"\\u00fc\\ud83d\\ude00\"\n  ]\n}"
        );
    }

    #[test]
    fn floats_as_python() {
        assert_eq!(float_repr(1.0), "1.0");
        assert_eq!(float_repr(0.1), "0.1");
        assert_eq!(float_repr(1e16), "1e+16");
        assert_eq!(float_repr(1.5e-5), "1.5e-05");
        assert_eq!(float_repr(0.0001), "0.0001");
        assert_eq!(float_repr(-123456.789), "-123456.789");
    }

    #[test]
    fn repr_as_python() {
        let v = crate::messages::to_value(&serde_json::json!({"a": [true, null, "it's", 2]}));
        let mut s = String::new();
        py_repr(&v, &mut s);
        assert_eq!(s, r#"{'a': [True, None, "it's", 2]}"#);
    }

    #[test]
    fn civil_dates_and_strftime() {
        let t = Civil::from_unix(0);
        assert_eq!(
            (t.year, t.month, t.day, t.weekday, t.yday),
            (1970, 1, 1, 3, 1)
        );
        // 2024-07-26T13:05:09Z, a Friday, day 208 of a leap year.
        let t = Civil::from_unix(1_722_000_000 - 1_722_000_000 % 86_400 + 13 * 3600 + 5 * 60 + 9);
        assert_eq!(strftime(&t, "%d %b %Y"), "26 Jul 2024");
        assert_eq!(
            strftime(&t, "%A %B %e %H:%M:%S %I%p %j %y %%"),
            "Friday July 26 13:05:09 01PM 208 24 %"
        );
        let t = Civil::from_unix(951_782_400); // 2000-02-29
        assert_eq!(strftime(&t, "%F %a"), "2000-02-29 Tue");
    }
}
