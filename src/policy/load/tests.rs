//! What Psych's `YAML.safe_load` (as GitLab calls it) makes of each kind of scalar and document.

use super::*;
use serde_json::json;

fn value(yaml: &str) -> Value {
    load(&format!("v: {yaml}\n")).expect("loads").expect("not empty")["v"].clone()
}

fn refused(yaml: &str) -> String {
    load(yaml).expect_err("should be refused").to_string()
}

#[test]
fn yaml_1_1_booleans_as_psych_reads_them() {
    for t in ["yes", "Yes", "YES", "yEs", "true", "True", "TRUE", "on", "On", "ON"] {
        assert_eq!(value(t), json!(true), "{t}");
    }
    for f in ["no", "No", "NO", "false", "False", "FALSE", "off", "Off", "OFF"] {
        assert_eq!(value(f), json!(false), "{f}");
    }
    // Psych's ScalarScanner has no y/n booleans.
    for s in ["y", "Y", "n", "N", "yess", "truth"] {
        assert_eq!(value(s), json!(s), "{s}");
    }
    // Quoted and block scalars are strings, a tag decides over the text.
    assert_eq!(value("'yes'"), json!("yes"));
    assert_eq!(value("\"on\""), json!("on"));
    assert_eq!(value("!!str yes"), json!("yes"));
    assert_eq!(value("!!bool yes"), json!(true));
}

#[test]
fn nulls() {
    for n in ["~", "null", "Null", "NULL", ""] {
        assert_eq!(value(n), Value::Null, "{n:?}");
    }
    assert_eq!(value("'~'"), json!("~"));
}

#[test]
fn yaml_1_1_integers_and_floats() {
    let cases = [
        ("42", json!(42)),
        ("-17", json!(-17)),
        ("+5", json!(5)),
        ("0", json!(0)),
        ("0x1F", json!(31)),
        ("-0x1f", json!(-31)),
        ("0b101", json!(5)),
        ("010", json!(8)),
        ("0_7", json!(7)),
        ("1_000", json!(1000)),
        ("1,000", json!(1000)),
        ("1:30", json!(5400)),
        ("1:30:15", json!(5415)),
        ("1.5", json!(1.5)),
        ("-.5", json!(-0.5)),
        ("1.", json!(1.0)),
        ("1.5e+3", json!(1500.0)),
        ("1_000.5", json!(1000.5)),
    ];
    for (text, expected) in cases {
        assert_eq!(value(text), expected, "{text}");
    }
    // Not numbers to Psych.
    for s in ["0o17", "08", "1e3", "1.0e3", "1__000", "0x", ".", "12abc", "1_"] {
        assert_eq!(value(s), json!(s), "{s}");
    }
    assert_eq!(value("'42'"), json!("42"));
    assert_eq!(value("!!str 42"), json!("42"));
    assert_eq!(value("!!float 1"), json!(1.0));
}

#[test]
fn dates_and_times_are_refused_like_safe_load_refuses_them() {
    for d in [
        "2024-01-31",
        "2024-1-5",
        "2024-02-31",
        "2024-01-31T10:00:00Z",
        "2024-01-31 10:00:00 +02:00",
        "2001-12-14t21:59:43.10-05:00",
    ] {
        let e = refused(&format!("v: {d}\n"));
        assert!(e.contains("YAML.safe_load refuses") && e.contains("line 1"), "{d}: {e}");
    }
    // Quoted, or not a date by Psych's pattern: strings.
    assert_eq!(value("'2024-01-31'"), json!("2024-01-31"));
    assert_eq!(value("2024-13-01"), json!("2024-13-01"));
    assert_eq!(value("2024-01-31x"), json!("2024-01-31x"));
}

#[test]
fn ruby_objects_are_refused_and_symbols_permitted() {
    assert!(refused("v: !ruby/object:Gem::Installer {}\n").contains("!ruby/object:Gem::Installer"));
    assert!(refused("v: !ruby/regexp /a/\n").contains("ruby/regexp"));
    assert_eq!(value(":default"), json!("default"));
    assert_eq!(value("!ruby/symbol x"), json!("x"));
    let doc = load(":name: x\n").unwrap().unwrap();
    assert_eq!(doc, json!({"name": "x"}));
}

#[test]
fn first_document_only_and_the_last_duplicate_key_wins() {
    let doc = load("a: 1\na: 2\n---\nb: [\n").unwrap().unwrap();
    assert_eq!(doc, json!({"a": 2}));
    assert_eq!(load("").unwrap(), None);
    assert_eq!(load("# only a comment\n").unwrap(), None);
}

#[test]
fn keys_are_stringified_as_gitlab_stringifies_them() {
    let doc = load("1: a\ntrue: b\n~: c\n1.5: d\n").unwrap().unwrap();
    assert_eq!(doc, json!({"1": "a", "true": "b", "": "c", "1.5": "d"}));
}

#[test]
fn merge_keys_as_psych_merges() {
    let doc = load("base: &b {x: 1, y: 2}\nm:\n  y: 0\n  <<: *b\n  z: 3\n").unwrap().unwrap();
    // Psych's `merge!` lets the merged mapping override keys written before `<<`.
    assert_eq!(doc["m"], json!({"x": 1, "y": 2, "z": 3}));
    let doc = load("a: &a {x: 1}\nb: &b {x: 2, y: 2}\nm: {<<: [*a, *b], z: 3}\n").unwrap().unwrap();
    assert_eq!(doc["m"], json!({"x": 1, "y": 2, "z": 3}));
    let doc = load("m: {<<: 5}\n").unwrap().unwrap();
    assert_eq!(doc["m"], json!({"<<": 5}));
}

#[test]
fn aliases_are_allowed_and_counted_without_copying() {
    let doc = load("a: &x [1, 2]\nb: *x\n").unwrap().unwrap();
    assert_eq!(doc["b"], json!([1, 2]));
    // A doubling chain: 2^40 values from a few hundred bytes, refused at once.
    let mut text = String::from("l0: &l0 [x, x]\n");
    for i in 1..40 {
        text.push_str(&format!("l{i}: &l{i} [*l{}, *l{}]\n", i - 1, i - 1));
    }
    assert_eq!(load(&text), Err(LoadError::TooBig));
    // K x M: one list of 1,000 items used 1,000 times.
    let items = vec!["1"; 1000].join(", ");
    let uses = vec!["*k"; 1000].join(", ");
    assert_eq!(load(&format!("a: &k [{items}]\nb: [{uses}]\n")), Err(LoadError::TooBig));
    // An alias to an anchor that is not defined is a syntax error.
    assert!(matches!(load("a: *nope\n"), Err(LoadError::Syntax(_))));
}

#[test]
fn nesting_beyond_gitlabs_depth_is_refused_also_through_aliases() {
    let nested = |n: usize| format!("a: {}1{}\n", "[".repeat(n), "]".repeat(n));
    assert!(load(&nested(MAX_DEPTH - 1)).is_ok());
    assert_eq!(load(&nested(MAX_DEPTH)), Err(LoadError::TooDeep));
    // Each level is shallow, the expansion is deep.
    let mut text = String::from("l0: &l0 [x]\n");
    for i in 1..120 {
        text.push_str(&format!("l{i}: &l{i} [*l{}]\n", i - 1));
    }
    assert_eq!(load(&text), Err(LoadError::TooDeep));
}

#[test]
fn syntax_errors_say_where() {
    let e = refused("a: [\n");
    assert!(e.starts_with("not valid YAML"), "{e}");
    assert!(refused("cadence: */10 * * * *\n").starts_with("not valid YAML"));
}

#[test]
fn control_characters_are_refused_even_in_comments() {
    let e = refused("a: 1 # \u{0}\n");
    assert_eq!(e, "not valid YAML: control characters are not allowed (U+0000 at line 1)");
    assert!(load("a: \"\\u0007 escaped is fine\"\n").is_ok());
}
