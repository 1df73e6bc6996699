//! Errors as one-line messages for people: the OS's wording without its
//! error number, and a chain of causes without repeats.

use std::error::Error;
use std::io;

/// The first `io::Error` among an error and its sources.
pub fn find_io_error<'a>(e: &'a (dyn Error + 'static)) -> Option<&'a io::Error> {
    let mut current = Some(e);
    while let Some(e) = current {
        if let Some(io) = e.downcast_ref::<io::Error>() {
            return Some(io);
        }
        current = e.source();
    }
    None
}

/// `Connection refused (os error 111)` becomes `connection refused`.
pub fn describe_io(e: &io::Error) -> String {
    let text = e.to_string();
    let text = match text.rfind(" (os error ") {
        Some(i) if text.ends_with(')') => &text[..i],
        _ => &text,
    };
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => format!("{:?}", e.kind()).to_lowercase(),
    }
}

/// An error and its sources on one line, without repeats.
pub fn error_chain(e: &(dyn Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let msg = s.to_string();
        if !out.ends_with(&msg) {
            out.push_str(": ");
            out.push_str(&msg);
        }
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn os_wording_without_the_number() {
        let e = io::Error::from_raw_os_error(111);
        assert_eq!(describe_io(&e), "connection refused");
        let wrapped = io::Error::other(e);
        assert_eq!(
            find_io_error(&wrapped).map(describe_io).as_deref(),
            Some("connection refused")
        );
    }
}
