//! Data-driven tests in the style of toydb's golden scripts.
//!
//! A script is a text file of inputs, each on a line starting with `> `, followed by the output
//! they produce. Lines starting with `#` and blank lines are kept as they are. The runner feeds
//! each input to a closure, rebuilds the file with the actual output, and compares it with the
//! file on disk; `UPDATE_GOLDEN=1` rewrites the file instead, so a change in behaviour is
//! reviewed as a diff of the script.
//!
//! It is its own crate, a dev-dependency of the crates whose tests use it, so no production
//! library or binary carries test code.

#![warn(missing_docs)]

use std::path::Path;

/// Runs the script at `path`; `run` maps one input line to its output (any number of lines).
pub fn check_script(path: &Path, mut run: impl FnMut(&str) -> String) {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let mut actual = String::new();
    for line in text.lines() {
        if let Some(input) = line.strip_prefix("> ") {
            actual.push_str(line);
            actual.push('\n');
            let out = run(input);
            for l in out.lines() {
                actual.push_str(l);
                actual.push('\n');
            }
        } else if line.is_empty() || line.starts_with('#') {
            actual.push_str(line);
            actual.push('\n');
        }
        // Other lines are the expected output, regenerated above.
    }
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(path, &actual).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
        return;
    }
    if actual != text {
        let diff: Vec<String> = text
            .lines()
            .zip(actual.lines())
            .enumerate()
            .filter(|(_, (a, b))| a != b)
            .take(5)
            .map(|(i, (a, b))| format!("line {}:\n  expected: {a}\n  actual:   {b}", i + 1))
            .collect();
        panic!(
            "{} does not match (UPDATE_GOLDEN=1 rewrites it)\n{}\n--- full actual output ---\n{actual}",
            path.display(),
            diff.join("\n")
        );
    }
}
