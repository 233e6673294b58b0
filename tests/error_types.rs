//! Errors in the library are typed enums (STYLE.md), never preformatted text: no `Result<_, String>`
//! in `src/` outside tests, and no `anyhow` or `Box<dyn Error>` below `main.rs`. A source scan,
//! as `config_reference` does for keys: a new `Result<T, String>` fails here, naming the file and
//! line, instead of waiting for a reviewer to spot it.

use std::fs;
use std::path::{Path, PathBuf};

/// Where the scan may still find a `String` error, each with why. Empty: add a row only with a
/// reason a reviewer accepts (text that came over the wire as text, say).
const ALLOWED: &[(&str, &str)] = &[];

/// Each `Result<..>` in `code` whose error (second argument) is `String`: its byte offset and
/// the type as found.
fn string_results(code: &str) -> Vec<(usize, String)> {
    let mut found = Vec::new();
    let mut from = 0;
    while let Some(at) = code[from..].find("Result<").map(|i| from + i) {
        let after = &code[at + "Result<".len()..];
        // Only the type itself: `io::Result<` and `Result<` both count, `MyResult<` does not.
        let before = code[..at].chars().next_back();
        let standalone = !before.is_some_and(|c| c.is_alphanumeric() || c == '_');
        if standalone
            && let Some(args) = generic_args(after)
            && args.len() == 2
            && args[1] == "String"
        {
            found.push((at, format!("Result<{}>", args.join(", "))));
        }
        from = at + "Result<".len();
    }
    found
}

/// The top-level arguments of `<..>` whose opening `<` was just consumed, trimmed.
fn generic_args(text: &str) -> Option<Vec<String>> {
    let (mut depth, mut args, mut current) = (0usize, Vec::new(), String::new());
    let mut previous = ' ';
    for c in text.chars() {
        match c {
            '<' | '(' | '[' => depth += 1,
            // `->` inside `Fn(..) -> T` is not a closing bracket.
            '>' if previous == '-' => {}
            '>' | ')' | ']' if depth == 0 => {
                // A trailing comma leaves nothing after it.
                if !current.trim().is_empty() {
                    args.push(current.trim().to_string());
                }
                return Some(args);
            }
            '>' | ')' | ']' => depth -= 1,
            ',' if depth == 0 => {
                args.push(std::mem::take(&mut current).trim().to_string());
                previous = c;
                continue;
            }
            _ => {}
        }
        current.push(c);
        previous = c;
    }
    None
}

/// The file's code with its inline unit tests (`#[cfg(test)] mod x { .. }`, which may collect
/// failures as text) and its `//` comments blanked out; lines keep their numbers.
fn non_test_code(text: &str) -> String {
    let mut code: String = text
        .lines()
        .map(|line| line.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n");
    let marker = "#[cfg(test)]\nmod ";
    let mut from = 0;
    while let Some(start) = code[from..].find(marker).map(|i| from + i) {
        let header_end = code[start..].find('\n').map_or(code.len(), |i| start + i);
        let header_end = match code.get(header_end + 1..) {
            Some(rest) => rest.find('\n').map_or(code.len(), |i| header_end + 1 + i),
            None => code.len(),
        };
        if !code[start..header_end].trim_end().ends_with('{') {
            from = header_end;
            continue;
        }
        let mut depth = 0usize;
        let mut end = code.len();
        for (i, c) in code[start..].char_indices() {
            match c {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        end = start + i + 1;
                        break;
                    }
                }
                _ => {}
            }
        }
        let blank: String = code[start..end]
            .chars()
            // Byte for byte, so that offsets after it stay where they were.
            .map(|c| {
                if c == '\n' {
                    "\n".to_string()
                } else {
                    " ".repeat(c.len_utf8())
                }
            })
            .collect();
        code.replace_range(start..end, &blank);
        from = end;
    }
    code
}

fn is_test_file(path: &Path) -> bool {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    name == "tests.rs"
        || name.ends_with("_tests.rs")
        || path.components().any(|c| c.as_os_str() == "tests")
}

fn rust_files(dir: &Path, files: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).expect("src is readable") {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            rust_files(&path, files);
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
}

/// Every offence in `src/` as `path:line: what`.
fn offences() -> Vec<String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    rust_files(&root.join("src"), &mut files);
    files.sort();
    assert!(
        files.len() > 50,
        "found only {} files under src/",
        files.len()
    );
    let mut offences = Vec::new();
    for path in &files {
        // Relative, so that a checkout under a directory named `tests` is still scanned.
        let relative = path.strip_prefix(root).unwrap_or(path);
        if is_test_file(relative) {
            continue;
        }
        let relative = relative.to_string_lossy().into_owned();
        if ALLOWED.iter().any(|(allowed, _)| *allowed == relative) {
            continue;
        }
        let code = non_test_code(&fs::read_to_string(path).expect("a source file is UTF-8"));
        let line_of = |offset: usize| code[..offset].matches('\n').count() + 1;
        for (offset, what) in string_results(&code) {
            offences.push(format!("{relative}:{}: {what}", line_of(offset)));
        }
        if relative != "src/main.rs" {
            for what in ["anyhow", "Box<dyn std::error::Error", "Box<dyn Error"] {
                for (offset, _) in code.match_indices(what) {
                    offences.push(format!("{relative}:{}: {what} below main", line_of(offset)));
                }
            }
        }
    }
    offences
}

#[test]
fn no_string_errors_in_the_library() {
    let offences = offences();
    assert!(
        offences.is_empty(),
        "errors must be typed enums (thiserror), not String; found:\n{}",
        offences.join("\n")
    );
}

/// The scanner itself: it must see the forms a String error takes, and leave the rest alone.
#[test]
fn the_scan_finds_string_errors_and_only_them() {
    let flagged = [
        "fn parse(text: &str) -> Result<Duration, String> {",
        "fn start(&self) -> BoxFuture<'_, Result<(), String>>;",
        "Fut: Future<Output = Result<(), String>> + Send,",
        "fn f() -> Result<Vec<(u8, u16)>, String>",
        "fn g() -> std::result::Result<Box<dyn Fn(u8) -> u8>, String>",
    ];
    for code in flagged {
        assert_eq!(string_results(code).len(), 1, "{code}");
    }
    let split = "fn s() -> Result<\n    u8,\n    String,\n> {";
    assert_eq!(
        string_results(split).len(),
        1,
        "over lines, with a trailing comma"
    );
    let clean = [
        "fn labels(&self) -> Result<BTreeMap<String, String>, MeshError> {",
        "fn name() -> Result<String, NameError>",
        "fn read() -> io::Result<String>",
        "type ParseResult<T> = MyResult<T, String>;",
        "fn h() -> Result<Result<(), AckRefusal>, ZdsError>",
    ];
    for code in clean {
        assert!(string_results(code).is_empty(), "{code}");
    }
    let code = non_test_code(
        "fn a() {} // Result<(), String>\n#[cfg(test)]\nmod tests {\n fn b() -> Result<(), String> {}\n}\nfn c() -> Result<(), String>;\n",
    );
    let found: Vec<usize> = string_results(&code).iter().map(|(at, _)| *at).collect();
    assert_eq!(found.len(), 1, "only c, after the test module: {code:?}");
    assert_eq!(code[..found[0]].matches('\n').count(), 5, "c is on line 6");
}
