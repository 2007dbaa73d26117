//! The bits of Python semantics that ComfyUI's validator relies on: `str()`, `repr()`,
//! `==`, `<`, `int()`, `float()`, `bool()` and `in`, applied to JSON values the way
//! CPython 3.12 applies them to the objects `json.loads` produces.

use std::cmp::Ordering;

use serde_json::{Number, Value};

/// A Python exception: builtin class name plus `str(exc)`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct PyExc {
    pub kind: &'static str,
    pub message: String,
}

impl PyExc {
    pub fn new(kind: &'static str, message: impl Into<String>) -> Self {
        PyExc {
            kind,
            message: message.into(),
        }
    }
    pub fn type_error(message: impl Into<String>) -> Self {
        Self::new("TypeError", message)
    }
    pub fn key_error(key: &Value) -> Self {
        // str(KeyError(k)) is repr(k).
        Self::new("KeyError", py_repr(key))
    }
}

/// `type(v).__name__` for the object `json.loads` would produce.
pub(crate) fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "NoneType",
        Value::Bool(_) => "bool",
        Value::Number(n) if n.is_f64() => "float",
        Value::Number(_) => "int",
        Value::String(_) => "str",
        Value::Array(_) => "list",
        Value::Object(_) => "dict",
    }
}

/// `repr(float)`: shortest round-trip digits, scientific outside 1e-4 <= |x| < 1e16.
pub fn float_repr(x: f64) -> String {
    if x.is_nan() {
        return "nan".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "inf".into() } else { "-inf".into() };
    }
    if x == 0.0 {
        return if x.is_sign_negative() {
            "-0.0".into()
        } else {
            "0.0".into()
        };
    }
    let sci = format!("{:e}", x.abs());
    let (mant, exp) = sci.split_once('e').unwrap_or((sci.as_str(), "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let digits: String = mant.chars().filter(|c| *c != '.').collect();
    let mut out = String::new();
    if x < 0.0 {
        out.push('-');
    }
    if (-4..16).contains(&exp) {
        if exp >= 0 {
            let int_len = exp as usize + 1;
            if digits.len() <= int_len {
                out.push_str(&digits);
                out.extend(std::iter::repeat_n('0', int_len - digits.len()));
                out.push_str(".0");
            } else {
                out.push_str(&digits[..int_len]);
                out.push('.');
                out.push_str(&digits[int_len..]);
            }
        } else {
            out.push_str("0.");
            out.extend(std::iter::repeat_n('0', (-exp - 1) as usize));
            out.push_str(&digits);
        }
    } else {
        out.push_str(&digits[..1]);
        if digits.len() > 1 {
            out.push('.');
            out.push_str(&digits[1..]);
        }
        out.push('e');
        out.push(if exp < 0 { '-' } else { '+' });
        out.push_str(&format!("{:02}", exp.abs()));
    }
    out
}

fn number_repr(n: &Number) -> String {
    if let Some(i) = n.as_i64() {
        i.to_string()
    } else if let Some(u) = n.as_u64() {
        u.to_string()
    } else {
        float_repr(n.as_f64().unwrap_or(f64::NAN))
    }
}

/// Rough `str.isprintable()`: exact for ASCII and Latin-1, close enough elsewhere.
fn is_printable(c: char) -> bool {
    if c == ' ' {
        return true;
    }
    if c.is_control() || c.is_whitespace() {
        return false;
    }
    let u = c as u32;
    !matches!(u,
        0xAD | 0x600..=0x605 | 0x61C | 0x6DD | 0x70F | 0x180E | 0x200B..=0x200F
        | 0x202A..=0x202E | 0x2060..=0x206F | 0xD800..=0xDFFF | 0xE000..=0xF8FF
        | 0xFDD0..=0xFDEF | 0xFEFF | 0xFFF9..=0xFFFB | 0xFFFE | 0xFFFF
        | 0xF0000..=0x10FFFF)
}

/// `repr(str)`.
pub(crate) fn str_repr(s: &str) -> String {
    let quote = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    let mut out = String::with_capacity(s.len() + 2);
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
            c if is_printable(c) => out.push(c),
            c => {
                let u = c as u32;
                if u < 0x100 {
                    out.push_str(&format!("\\x{u:02x}"));
                } else if u < 0x10000 {
                    out.push_str(&format!("\\u{u:04x}"));
                } else {
                    out.push_str(&format!("\\U{u:08x}"));
                }
            }
        }
    }
    out.push(quote);
    out
}

/// `repr(v)`.
pub(crate) fn py_repr(v: &Value) -> String {
    let mut out = String::new();
    write_repr(v, &mut out);
    out
}

fn write_repr(v: &Value, out: &mut String) {
    match v {
        Value::Null => out.push_str("None"),
        Value::Bool(true) => out.push_str("True"),
        Value::Bool(false) => out.push_str("False"),
        Value::Number(n) => out.push_str(&number_repr(n)),
        Value::String(s) => out.push_str(&str_repr(s)),
        Value::Array(a) => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_repr(x, out);
            }
            out.push(']');
        }
        Value::Object(m) => {
            out.push('{');
            for (i, (k, x)) in m.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                out.push_str(&str_repr(k));
                out.push_str(": ");
                write_repr(x, out);
            }
            out.push('}');
        }
    }
}

/// `str(v)`.
pub fn py_str(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => py_repr(other),
    }
}

/// `bool(v)`.
pub fn truthy(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64().is_some_and(|f| f != 0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Object(m) => !m.is_empty(),
    }
}

/// A Python real number.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Num {
    Int(i128),
    /// An int or float, compared as f64 (ints beyond i128 land here).
    Float(f64),
}

impl Num {
    pub fn of(v: &Value) -> Option<Num> {
        match v {
            Value::Bool(b) => Some(Num::Int(*b as i128)),
            Value::Number(n) => Some(if let Some(i) = n.as_i64() {
                Num::Int(i as i128)
            } else if let Some(u) = n.as_u64() {
                Num::Int(u as i128)
            } else {
                Num::Float(n.as_f64().unwrap_or(f64::NAN))
            }),
            _ => None,
        }
    }
    fn as_f64(self) -> f64 {
        match self {
            Num::Int(i) => i as f64,
            Num::Float(f) => f,
        }
    }
    pub fn partial_cmp(self, other: Num) -> Option<Ordering> {
        match (self, other) {
            (Num::Int(a), Num::Int(b)) => Some(a.cmp(&b)),
            (a, b) => a.as_f64().partial_cmp(&b.as_f64()),
        }
    }
}

/// `a == b`.
pub(crate) fn py_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Null, Value::Null) => true,
        (Value::String(x), Value::String(y)) => x == y,
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(p, q)| py_eq(p, q))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, p)| y.get(k).is_some_and(|q| py_eq(p, q)))
        }
        _ => match (Num::of(a), Num::of(b)) {
            (Some(x), Some(y)) => x.partial_cmp(y) == Some(Ordering::Equal),
            _ => false,
        },
    }
}

/// `item in container`.
pub(crate) fn py_contains(container: &Value, item: &Value) -> Result<bool, PyExc> {
    match container {
        Value::Array(a) => Ok(a.iter().any(|x| py_eq(x, item))),
        Value::Object(m) => match item {
            Value::String(s) => Ok(m.contains_key(s)),
            Value::Array(_) | Value::Object(_) => Err(PyExc::type_error(format!(
                "unhashable type: '{}'",
                type_name(item)
            ))),
            // JSON object keys are strings: no other hashable is ever a key.
            _ => Ok(false),
        },
        Value::String(s) => match item {
            Value::String(i) => Ok(s.contains(i.as_str())),
            other => Err(PyExc::type_error(format!(
                "'in <string>' requires string as left operand, not {}",
                type_name(other)
            ))),
        },
        other => Err(PyExc::type_error(format!(
            "argument of type '{}' is not iterable",
            type_name(other)
        ))),
    }
}

/// `container[key]` for a string key.
pub(crate) fn py_getitem<'v>(container: &'v Value, key: &str) -> Result<&'v Value, PyExc> {
    match container {
        Value::Object(m) => m
            .get(key)
            .ok_or_else(|| PyExc::key_error(&Value::String(key.to_owned()))),
        Value::Array(_) => Err(PyExc::type_error(
            "list indices must be integers or slices, not str",
        )),
        Value::String(_) => Err(PyExc::type_error(
            "string indices must be integers, not 'str'",
        )),
        other => Err(PyExc::type_error(format!(
            "'{}' object is not subscriptable",
            type_name(other)
        ))),
    }
}

/// `seq[index]` where `seq` is a tuple/list named `seq_name` of length `len`.
pub(crate) fn py_index(seq_name: &str, len: usize, index: &Value) -> Result<usize, PyExc> {
    let i: i128 = match index {
        Value::Bool(b) => *b as i128,
        Value::Number(n) if !n.is_f64() => match Num::of(index) {
            Some(Num::Int(i)) => i,
            _ => 0,
        },
        other => {
            return Err(PyExc::type_error(format!(
                "{seq_name} indices must be integers or slices, not {}",
                type_name(other)
            )));
        }
    };
    let len_i = len as i128;
    let resolved = if i < 0 { i + len_i } else { i };
    if (0..len_i).contains(&resolved) {
        Ok(resolved as usize)
    } else {
        Err(PyExc::new(
            "IndexError",
            format!("{seq_name} index out of range"),
        ))
    }
}

/// An int produced by `int()`: exact when it fits i128, else an f64 approximation
/// plus its exact decimal text.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct PyInt {
    pub exact: Option<i128>,
    pub approx: f64,
    pub text: String,
}

impl PyInt {
    fn from_i128(i: i128) -> Self {
        PyInt {
            exact: Some(i),
            approx: i as f64,
            text: i.to_string(),
        }
    }
    pub fn num(&self) -> Num {
        match self.exact {
            Some(i) => Num::Int(i),
            None => Num::Float(self.approx),
        }
    }
    /// As a JSON number: exact for the i64/u64 range, approximated beyond it.
    pub fn to_json(&self) -> Value {
        if let Some(i) = self.exact {
            if let Ok(v) = i64::try_from(i) {
                return Value::from(v);
            }
            if let Ok(v) = u64::try_from(i) {
                return Value::from(v);
            }
        }
        Number::from_f64(self.approx).map_or(Value::Null, Value::Number)
    }
}

/// Python's `str.isspace()` for the characters `int()`/`float()` strip.
fn is_py_space(c: char) -> bool {
    c.is_whitespace() || ('\x1c'..='\x1f').contains(&c)
}

/// Digits with single underscores between them (PEP 515); returns the digits.
fn digit_part(s: &str) -> Option<String> {
    if s.is_empty() || s.starts_with('_') || s.ends_with('_') || s.contains("__") {
        return None;
    }
    if !s.chars().all(|c| c.is_ascii_digit() || c == '_') {
        return None;
    }
    Some(s.chars().filter(|c| *c != '_').collect())
}

const INT_MAX_STR_DIGITS: usize = 4300;

fn parse_int_str(s: &str) -> Result<PyInt, PyExc> {
    let invalid = || {
        PyExc::new(
            "ValueError",
            format!("invalid literal for int() with base 10: {}", str_repr(s)),
        )
    };
    let t = s.trim_matches(is_py_space);
    let (neg, body) = match t.as_bytes().first() {
        Some(b'-') => (true, &t[1..]),
        Some(b'+') => (false, &t[1..]),
        _ => (false, t),
    };
    let digits = digit_part(body).ok_or_else(invalid)?;
    if digits.len() > INT_MAX_STR_DIGITS {
        return Err(PyExc::new(
            "ValueError",
            format!(
                "Exceeds the limit ({INT_MAX_STR_DIGITS} digits) for integer string conversion: \
                 value has {} digits; use sys.set_int_max_str_digits() to increase the limit",
                digits.len()
            ),
        ));
    }
    let trimmed = digits.trim_start_matches('0');
    let magnitude = if trimmed.is_empty() { "0" } else { trimmed };
    let text = if neg && magnitude != "0" {
        format!("-{magnitude}")
    } else {
        magnitude.to_owned()
    };
    let exact = text.parse::<i128>().ok();
    let approx = text.parse::<f64>().unwrap_or(f64::INFINITY);
    Ok(PyInt {
        exact,
        approx,
        text,
    })
}

/// Exact decimal text of an integral f64 (used where |x| exceeds i128).
fn integral_f64_text(x: f64) -> String {
    let bits = x.abs().to_bits();
    let exp = ((bits >> 52) & 0x7ff) as i32 - 1075;
    let mant = (bits & ((1u64 << 52) - 1)) | (1u64 << 52);
    // Little-endian base-1e9 limbs of mant * 2^exp (exp > 0 on this path).
    let mut limbs: Vec<u64> = vec![mant % 1_000_000_000, mant / 1_000_000_000];
    for _ in 0..exp.max(0) {
        let mut carry = 0u64;
        for l in limbs.iter_mut() {
            let v = *l * 2 + carry;
            *l = v % 1_000_000_000;
            carry = v / 1_000_000_000;
        }
        if carry > 0 {
            limbs.push(carry);
        }
    }
    while limbs.len() > 1 && limbs.last() == Some(&0) {
        limbs.pop();
    }
    let mut out = String::new();
    if x < 0.0 {
        out.push('-');
    }
    let mut iter = limbs.iter().rev();
    if let Some(first) = iter.next() {
        out.push_str(&first.to_string());
    }
    for l in iter {
        out.push_str(&format!("{l:09}"));
    }
    out
}

/// `int(v)`.
pub(crate) fn py_int(v: &Value) -> Result<PyInt, PyExc> {
    match v {
        Value::Bool(b) => Ok(PyInt::from_i128(*b as i128)),
        Value::Number(_) => match Num::of(v) {
            Some(Num::Int(i)) => Ok(PyInt::from_i128(i)),
            Some(Num::Float(f)) => {
                if f.is_nan() {
                    return Err(PyExc::new(
                        "ValueError",
                        "cannot convert float NaN to integer",
                    ));
                }
                if f.is_infinite() {
                    return Err(PyExc::new(
                        "OverflowError",
                        "cannot convert float infinity to integer",
                    ));
                }
                let t = f.trunc();
                if t.abs() < 1.0e38 {
                    Ok(PyInt::from_i128(t as i128))
                } else {
                    Ok(PyInt {
                        exact: None,
                        approx: t,
                        text: integral_f64_text(t),
                    })
                }
            }
            None => Ok(PyInt::from_i128(0)),
        },
        Value::String(s) => parse_int_str(s),
        other => Err(PyExc::type_error(format!(
            "int() argument must be a string, a bytes-like object or a real number, not '{}'",
            type_name(other)
        ))),
    }
}

fn parse_float_str(s: &str) -> Result<f64, PyExc> {
    let invalid = || {
        PyExc::new(
            "ValueError",
            format!("could not convert string to float: {}", str_repr(s)),
        )
    };
    let t = s.trim_matches(is_py_space);
    let (neg, body) = match t.as_bytes().first() {
        Some(b'-') => (true, &t[1..]),
        Some(b'+') => (false, &t[1..]),
        _ => (false, t),
    };
    let lower = body.to_ascii_lowercase();
    let magnitude = if lower == "inf" || lower == "infinity" {
        f64::INFINITY
    } else if lower == "nan" {
        f64::NAN
    } else {
        let (mantissa, exponent) = match lower.find('e') {
            Some(i) => (&lower[..i], Some(&lower[i + 1..])),
            None => (lower.as_str(), None),
        };
        let (int_part, frac_part) = match mantissa.split_once('.') {
            Some((a, b)) => (a, Some(b)),
            None => (mantissa, None),
        };
        let int_digits = if int_part.is_empty() {
            String::new()
        } else {
            digit_part(int_part).ok_or_else(invalid)?
        };
        let frac_digits = match frac_part {
            Some("") | None => String::new(),
            Some(f) => digit_part(f).ok_or_else(invalid)?,
        };
        if int_digits.is_empty() && frac_digits.is_empty() {
            return Err(invalid());
        }
        let mut canonical = format!("{int_digits}.{frac_digits}");
        if canonical.starts_with('.') {
            canonical.insert(0, '0');
        }
        if canonical.ends_with('.') {
            canonical.push('0');
        }
        if let Some(e) = exponent {
            let (esign, edigits) = match e.as_bytes().first() {
                Some(b'-') => ("-", &e[1..]),
                Some(b'+') => ("", &e[1..]),
                _ => ("", e),
            };
            let edigits = digit_part(edigits).ok_or_else(invalid)?;
            canonical.push('e');
            canonical.push_str(esign);
            canonical.push_str(&edigits);
        }
        canonical.parse::<f64>().map_err(|_| invalid())?
    };
    Ok(if neg { -magnitude } else { magnitude })
}

/// `float(v)`.
pub(crate) fn py_float(v: &Value) -> Result<f64, PyExc> {
    match v {
        Value::Bool(b) => Ok(*b as u8 as f64),
        Value::Number(n) => Ok(n.as_f64().unwrap_or(f64::NAN)),
        Value::String(s) => parse_float_str(s),
        other => Err(PyExc::type_error(format!(
            "float() argument must be a string or a real number, not '{}'",
            type_name(other)
        ))),
    }
}

/// A value after ComfyUI's INT/FLOAT/STRING/BOOLEAN conversion.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum PyVal {
    Json(Value),
    Int(PyInt),
    Float(f64),
}

impl PyVal {
    pub fn py_str(&self) -> String {
        match self {
            PyVal::Json(v) => py_str(v),
            PyVal::Int(i) => i.text.clone(),
            PyVal::Float(f) => float_repr(*f),
        }
    }
    /// What `json.dumps` would emit (non-finite floats become null: JSON has no NaN).
    pub fn to_json(&self) -> Value {
        match self {
            PyVal::Json(v) => v.clone(),
            PyVal::Int(i) => i.to_json(),
            PyVal::Float(f) => Number::from_f64(*f).map_or(Value::Null, Value::Number),
        }
    }
    /// The value to store back into the prompt. Values JSON cannot carry exactly keep
    /// the original input, which the GPU server converts again the same way.
    pub fn stored(&self, original: &Value) -> Value {
        match self {
            PyVal::Json(v) => v.clone(),
            PyVal::Int(i)
                if i.exact
                    .is_some_and(|e| i64::try_from(e).is_ok() || u64::try_from(e).is_ok()) =>
            {
                i.to_json()
            }
            PyVal::Int(_) => original.clone(),
            PyVal::Float(f) => Number::from_f64(*f).map_or_else(|| original.clone(), Value::Number),
        }
    }
    fn num(&self) -> Option<Num> {
        match self {
            PyVal::Json(v) => Num::of(v),
            PyVal::Int(i) => Some(i.num()),
            PyVal::Float(f) => Some(Num::Float(*f)),
        }
    }
    fn type_name(&self) -> &'static str {
        match self {
            PyVal::Json(v) => type_name(v),
            PyVal::Int(_) => "int",
            PyVal::Float(_) => "float",
        }
    }
    /// `self < other` (`less == true`) or `self > other`.
    pub fn compare(&self, other: &Value, less: bool) -> Result<bool, PyExc> {
        let want = if less {
            Ordering::Less
        } else {
            Ordering::Greater
        };
        if let (Some(a), Some(b)) = (self.num(), Num::of(other)) {
            return Ok(a.partial_cmp(b) == Some(want));
        }
        if let (PyVal::Json(Value::String(a)), Value::String(b)) = (self, other) {
            return Ok(a.as_str().cmp(b.as_str()) == want);
        }
        Err(PyExc::type_error(format!(
            "'{}' not supported between instances of '{}' and '{}'",
            if less { "<" } else { ">" },
            self.type_name(),
            type_name(other)
        )))
    }
}

/// `dict.get(key)` that treats a non-dict as empty.
pub(crate) fn obj_get<'v>(v: &'v Value, key: &str) -> Option<&'v Value> {
    v.as_object().and_then(|m| m.get(key))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn float_repr_matches_python() {
        let cases = [
            (1.0, "1.0"),
            (0.5, "0.5"),
            (100000.0, "100000.0"),
            (1e16, "1e+16"),
            (1.5e16, "1.5e+16"),
            (1234567890123456.0, "1234567890123456.0"),
            (0.0001, "0.0001"),
            (0.00001, "1e-05"),
            (1.5e-7, "1.5e-07"),
            (-2.5, "-2.5"),
            (0.1, "0.1"),
            (1e300, "1e+300"),
            (f64::INFINITY, "inf"),
            (-0.0, "-0.0"),
        ];
        for (x, want) in cases {
            assert_eq!(float_repr(x), want, "repr({x})");
        }
    }

    #[test]
    fn repr_of_containers_and_strings() {
        assert_eq!(
            py_repr(&json!(["a", 1, 1.0, true, null, {"k": "v"}])),
            "['a', 1, 1.0, True, None, {'k': 'v'}]"
        );
        assert_eq!(str_repr("it's"), "\"it's\"");
        assert_eq!(str_repr("a'b\"c"), "'a\\'b\"c'");
        assert_eq!(str_repr("tab\there\n"), "'tab\\there\\n'");
        assert_eq!(str_repr("\u{7}é"), "'\\x07é'");
    }

    #[test]
    fn int_conversion_follows_python() {
        assert_eq!(py_int(&json!(" 12 ")).unwrap().exact, Some(12));
        assert_eq!(py_int(&json!("1_000")).unwrap().exact, Some(1000));
        assert_eq!(py_int(&json!("-007")).unwrap().text, "-7");
        assert_eq!(py_int(&json!(1.9)).unwrap().exact, Some(1));
        assert_eq!(py_int(&json!(-1.9)).unwrap().exact, Some(-1));
        assert_eq!(py_int(&json!(true)).unwrap().exact, Some(1));
        assert_eq!(
            py_int(&json!("1.5")).unwrap_err().message,
            "invalid literal for int() with base 10: '1.5'"
        );
        assert_eq!(
            py_int(&json!("1__0")).unwrap_err().message,
            "invalid literal for int() with base 10: '1__0'"
        );
        assert_eq!(
            py_int(&json!(null)).unwrap_err().message,
            "int() argument must be a string, a bytes-like object or a real number, not 'NoneType'"
        );
        let big = py_int(&json!("123456789012345678901234567890123456789012")).unwrap();
        assert_eq!(big.exact, None);
        assert_eq!(big.text, "123456789012345678901234567890123456789012");
        assert_eq!(
            py_int(&json!(1e40)).unwrap().text,
            "10000000000000000303786028427003666890752"
        );
    }

    #[test]
    fn float_conversion_follows_python() {
        assert_eq!(py_float(&json!(" 1.5 ")).unwrap(), 1.5);
        assert_eq!(py_float(&json!("1_0.2_5")).unwrap(), 10.25);
        assert_eq!(py_float(&json!(".5")).unwrap(), 0.5);
        assert_eq!(py_float(&json!("5.")).unwrap(), 5.0);
        assert_eq!(py_float(&json!("-1e3")).unwrap(), -1000.0);
        assert!(py_float(&json!("Infinity")).unwrap().is_infinite());
        assert!(py_float(&json!("nan")).unwrap().is_nan());
        assert_eq!(
            py_float(&json!("abc")).unwrap_err().message,
            "could not convert string to float: 'abc'"
        );
        assert!(py_float(&json!("1e")).is_err());
        assert!(py_float(&json!(".")).is_err());
        assert!(py_float(&json!("0x10")).is_err());
    }

    #[test]
    fn membership_and_equality() {
        assert!(py_eq(&json!(1), &json!(1.0)));
        assert!(py_eq(&json!(true), &json!(1)));
        assert!(!py_eq(&json!("1"), &json!(1)));
        assert!(py_contains(&json!([1, "a"]), &json!(1.0)).unwrap());
        assert!(py_contains(&json!("abc"), &json!("b")).unwrap());
        assert_eq!(
            py_contains(&json!(3), &json!("x")).unwrap_err().message,
            "argument of type 'int' is not iterable"
        );
        assert_eq!(py_index("tuple", 2, &json!(-1)).unwrap(), 1);
        assert_eq!(py_index("tuple", 2, &json!(true)).unwrap(), 1);
        assert_eq!(
            py_index("tuple", 2, &json!(2)).unwrap_err().message,
            "tuple index out of range"
        );
        assert_eq!(
            py_index("tuple", 2, &json!("0")).unwrap_err().message,
            "tuple indices must be integers or slices, not str"
        );
    }
}
