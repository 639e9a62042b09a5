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
/// Panics, with the first differing lines, when the output differs from the script; with
/// `UPDATE_GOLDEN` set it rewrites the script instead.
pub fn check_script(path: &Path, run: impl FnMut(&str) -> String) {
    run_script(path, std::env::var_os("UPDATE_GOLDEN").is_some(), run);
}

/// [`check_script`] with the choice to rewrite passed in, so tests need not set the variable.
fn run_script(path: &Path, update: bool, mut run: impl FnMut(&str) -> String) {
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
    if update {
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

#[cfg(test)]
mod tests {
    use super::run_script;
    use std::path::PathBuf;

    const SCRIPT: &str = "# doubles its input\n> 2\n4\n\n> 3\n6\n";

    fn write(dir: &tempfile::TempDir, text: &str) -> PathBuf {
        let path = dir.path().join("script.txt");
        std::fs::write(&path, text).unwrap();
        path
    }

    fn double(input: &str) -> String {
        (input.parse::<u64>().unwrap() * 2).to_string()
    }

    #[test]
    fn a_script_whose_outputs_match_passes_and_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(&dir, SCRIPT);
        let mut inputs = Vec::new();
        run_script(&path, false, |i| {
            inputs.push(i.to_string());
            double(i)
        });
        assert_eq!(inputs, ["2", "3"]);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), SCRIPT);
    }

    #[test]
    fn a_wrong_output_fails_naming_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(&dir, &SCRIPT.replace("\n6\n", "\n7\n"));
        let err = std::panic::catch_unwind(|| run_script(&path, false, double))
            .expect_err("a wrong output must fail");
        let msg = err.downcast_ref::<String>().cloned().unwrap_or_default();
        assert!(msg.contains("line 6:"), "{msg}");
        assert!(
            msg.contains("expected: 7") && msg.contains("actual:   6"),
            "{msg}"
        );
    }

    #[test]
    fn a_missing_output_line_fails() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(&dir, "> 2\n> 3\n6\n");
        let result = std::panic::catch_unwind(|| run_script(&path, false, double));
        assert!(result.is_err(), "an input without its output must fail");
    }

    #[test]
    fn update_rewrites_the_outputs_and_keeps_comments_and_blank_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(&dir, "# doubles its input\n> 2\nstale\nmore stale\n\n> 3\n");
        run_script(&path, true, double);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), SCRIPT);
    }
}
