//! The Debian package as an administrator gets it: `scripts/package.sh` packages the binary under
//! test (no second build), and the real tools check the result: dpkg-deb (contents and modes),
//! lintian, dpkg (install and upgrade into a temporary root), systemd-analyze (the installed
//! units), man (the installed page), bash (the installed completion). A tool that is missing
//! fails the test with its name; scripts/install-deps.sh installs them all.

use crate::common::{BIN, stderr, stdout};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

const DIR: &str = env!("CARGO_MANIFEST_DIR");

/// Fails the test, naming the tool and where it comes from, when `tool` is not installed.
fn require(tool: &str, package: &str) {
    let found =
        Command::new("sh").args(["-c", &format!("command -v {tool}")]).output().is_ok_and(|o| o.status.success());
    assert!(found, "this test needs `{tool}` (Debian package {package}; scripts/install-deps.sh installs it)");
}

fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

fn ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(out.status.success(), "{cmd:?} failed ({}):\n{}{}", out.status, stdout(&out), stderr(&out));
    stdout(&out)
}

/// The .deb, built once for all the tests of this module.
fn deb() -> &'static Path {
    static DEB: OnceLock<PathBuf> = OnceLock::new();
    DEB.get_or_init(|| {
        let out_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("package");
        let _ = std::fs::remove_dir_all(&out_dir);
        let out = run(Command::new("bash")
            .arg(Path::new(DIR).join("scripts/package.sh"))
            .args(["--binary", BIN, "--fast", "--out"])
            .arg(&out_dir));
        assert!(out.status.success(), "scripts/package.sh failed:\n{}{}", stdout(&out), stderr(&out));
        let deb = PathBuf::from(stdout(&out).lines().last().unwrap_or_default());
        assert!(deb.is_file(), "scripts/package.sh printed no .deb path:\n{}", stdout(&out));
        deb
    })
}

/// The package's files unpacked into a fresh temporary root.
fn unpacked() -> tempfile::TempDir {
    require("dpkg-deb", "dpkg");
    let root = tempfile::tempdir().expect("temp dir");
    ok(Command::new("dpkg-deb").arg("-x").arg(deb()).arg(root.path()));
    root
}

#[test]
fn the_package_holds_every_file_with_its_mode() {
    require("dpkg-deb", "dpkg");
    let listing = ok(Command::new("dpkg-deb").arg("-c").arg(deb()));
    // "-rw-r--r-- 0/0  1234 2026-01-01 00:00 ./etc/policy-audit/config.toml"
    let entries: Vec<(&str, &str, &str)> = listing
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            (fields.len() >= 6).then(|| (fields[0], fields[1], fields[5].trim_start_matches('.')))
        })
        .collect();
    for (path, mode) in [
        ("/usr/bin/policy-audit", "-rwxr-xr-x"),
        ("/lib/systemd/system/policy-audit.service", "-rw-r--r--"),
        ("/lib/systemd/system/policy-audit-reconcile.service", "-rw-r--r--"),
        ("/lib/systemd/system/policy-audit-reconcile.timer", "-rw-r--r--"),
        ("/etc/policy-audit/config.toml", "-rw-r--r--"),
        ("/etc/default/policy-audit", "-rw-------"),
        ("/usr/share/man/man1/policy-audit.1.gz", "-rw-r--r--"),
        ("/usr/share/bash-completion/completions/policy-audit", "-rw-r--r--"),
        ("/usr/share/zsh/vendor-completions/_policy-audit", "-rw-r--r--"),
        ("/usr/share/fish/vendor_completions.d/policy-audit.fish", "-rw-r--r--"),
        ("/usr/share/doc/policy-audit/README.md", "-rw-r--r--"),
        ("/usr/share/doc/policy-audit/operations.md", "-rw-r--r--"),
        ("/usr/share/doc/policy-audit/configuration.md", "-rw-r--r--"),
        ("/usr/share/doc/policy-audit/events.md", "-rw-r--r--"),
        ("/usr/share/doc/policy-audit/examples/config.toml", "-rw-r--r--"),
        ("/usr/share/doc/policy-audit/copyright", "-rw-r--r--"),
        ("/usr/share/doc/policy-audit/changelog.Debian.gz", "-rw-r--r--"),
    ] {
        let Some((actual, owner, _)) = entries.iter().find(|(_, _, p)| *p == path) else {
            panic!("the package has no {path}:\n{listing}")
        };
        assert_eq!((*actual, *owner), (mode, "0/0"), "{path}");
    }
    // Conffiles: dpkg keeps the administrator's edits across upgrades.
    let conffiles = ok(Command::new("dpkg-deb").arg("--info").arg(deb()).arg("conffiles"));
    let mut conffiles: Vec<&str> = conffiles.lines().map(str::trim).collect();
    conffiles.sort();
    assert_eq!(conffiles, ["/etc/default/policy-audit", "/etc/policy-audit/config.toml"]);

    let root = unpacked();
    // The changelog's latest entry is this package version.
    let version = ok(Command::new("dpkg-deb").arg("--field").arg(deb()).arg("Version"));
    let changelog =
        ok(Command::new("gzip").arg("-dc").arg(root.path().join("usr/share/doc/policy-audit/changelog.Debian.gz")));
    assert!(
        changelog.lines().next().is_some_and(|l| l.starts_with(&format!("policy-audit ({}) ", version.trim()))),
        "changelog does not start with version {version}:\n{changelog}"
    );
    let secrets = root.path().join("etc/default/policy-audit");
    assert_eq!(std::fs::metadata(&secrets).expect("secrets file").len(), 0, "/etc/default/policy-audit is not empty");
    // The packaged config is the commented example pointing at the state directory the units
    // use, and it is valid as shipped.
    let config = root.path().join("etc/policy-audit/config.toml");
    let text = std::fs::read_to_string(&config).expect("packaged config");
    assert!(text.lines().any(|l| l == "state_dir = \"/var/lib/policy-audit\""), "{text}");
    assert!(text.contains("[[projects]]") && text.contains("# "), "not the commented example:\n{text}");
    let check = run(Command::new(BIN).arg("--config").arg(&config).arg("check-config"));
    assert!(check.status.success(), "{}", stderr(&check));
    assert!(stdout(&check).contains("state in /var/lib/policy-audit"), "{}", stdout(&check));
}

#[test]
fn lintian_reports_no_errors() {
    require("lintian", "lintian");
    let out = run(Command::new("lintian").arg("--no-cfg").arg(deb()));
    let report = stdout(&out);
    let errors: Vec<&str> = report.lines().filter(|l| l.starts_with("E: ")).collect();
    assert!(errors.is_empty() && out.status.success(), "lintian:\n{report}{}", stderr(&out));
}

#[test]
fn the_installed_units_verify() {
    require("systemd-analyze", "systemd");
    let root = unpacked();
    let out =
        run(Command::new("bash").arg(Path::new(DIR).join("scripts/verify-systemd.sh")).arg("--root").arg(root.path()));
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    let units = root.path().join("lib/systemd/system");
    let service = std::fs::read_to_string(units.join("policy-audit.service")).expect("installed service");
    assert!(service.lines().any(|l| l == "ExecStart=/usr/bin/policy-audit run"), "{service}");
    let oneshot = std::fs::read_to_string(units.join("policy-audit-reconcile.service")).expect("installed oneshot");
    assert!(oneshot.lines().any(|l| l == "ExecStart=/usr/bin/policy-audit reconcile"), "{oneshot}");
}

/// The commands `--help` lists (clap's own `help` aside).
fn commands_in_help() -> Vec<String> {
    let help = ok(Command::new(BIN).arg("--help"));
    let commands: Vec<String> = help
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .filter(|name| name != "help")
        .collect();
    assert!(commands.len() >= 9 && commands.iter().any(|c| c == "events"), "{help}");
    commands
}

#[test]
fn the_installed_man_page_renders_and_names_every_command() {
    require("man", "man-db");
    let root = unpacked();
    let page = root.path().join("usr/share/man/man1/policy-audit.1.gz");
    let out = run(Command::new("man")
        .arg("-l")
        .arg(&page)
        .env("MANWIDTH", "100")
        .env("LC_ALL", "C.UTF-8")
        .env_remove("MAN_KEEP_FORMATTING"));
    assert!(out.status.success() && stderr(&out).is_empty(), "man -l: {}", stderr(&out));
    let text = stdout(&out);
    for section in ["NAME", "SYNOPSIS", "OPTIONS", "COMMANDS", "EXIT STATUS", "FILES"] {
        assert!(text.lines().any(|l| l == section), "no {section} section:\n{text}");
    }
    let mut commands = commands_in_help();
    commands.push("deliveries retry".to_string());
    for command in commands {
        let heading = format!("policy-audit {command}");
        assert!(text.lines().any(|l| l.trim() == heading), "the man page has no section for {heading}:\n{text}");
    }
    // Options of a command are there too.
    assert!(text.contains("--backfill") && text.contains("--format"), "{text}");
    assert!(!text.contains("policy-audit man"), "the hidden man command is documented:\n{text}");
    // And the installed page is the one the binary generates.
    let installed = ok(Command::new("gzip").arg("-dc").arg(&page));
    assert_eq!(installed, ok(Command::new(BIN).arg("man")));
}

/// What bash's programmable completion offers for `words` (the last one being completed), with
/// the completion script at `script` loaded the way bash-completion loads it.
fn bash_complete(script: &Path, words: &[&str]) -> Vec<String> {
    require("bash", "bash");
    let quoted: Vec<String> = words.iter().map(|w| format!("'{w}'")).collect();
    let program = format!(
        r#"source "$1" || exit 3
fn=$(complete -p policy-audit | sed -n 's/.* -F \([^ ]*\) .*/\1/p')
[ -n "$fn" ] || {{ echo "no completion function registered for policy-audit" >&2; exit 4; }}
COMP_WORDS=({words})
COMP_CWORD=$(( ${{#COMP_WORDS[@]}} - 1 ))
COMP_LINE="${{COMP_WORDS[*]}}"
COMP_POINT=${{#COMP_LINE}}
"$fn" policy-audit "${{COMP_WORDS[COMP_CWORD]}}" "${{COMP_WORDS[COMP_CWORD-1]}}"
printf '%s\n' "${{COMPREPLY[@]}}""#,
        words = quoted.join(" ")
    );
    let out = ok(Command::new("bash").arg("--norc").arg("--noprofile").arg("-c").arg(program).arg("bash").arg(script));
    out.lines().filter(|l| !l.is_empty()).map(str::to_string).collect()
}

#[test]
fn the_installed_bash_completion_completes_ev_to_events() {
    let root = unpacked();
    let script = root.path().join("usr/share/bash-completion/completions/policy-audit");
    assert_eq!(bash_complete(&script, &["policy-audit", "ev"]), ["events"]);
    // A command's own options complete too (the bin name's hyphen once broke that).
    assert_eq!(bash_complete(&script, &["policy-audit", "events", "--fo"]), ["--format"]);
    assert_eq!(bash_complete(&script, &["policy-audit", "deliveries", "retry", "--dest"]), ["--destination"]);
    assert_eq!(
        std::fs::read_to_string(&script).expect("installed script"),
        ok(Command::new(BIN).args(["completions", "bash"]))
    );
}

#[test]
fn completions_prints_the_script_for_each_shell() {
    for (shell, marker) in
        [("bash", "complete -F _policy__audit"), ("zsh", "#compdef policy-audit"), ("fish", "complete -c policy-audit")]
    {
        let out = ok(Command::new(BIN).args(["completions", shell]));
        assert!(out.contains(marker), "completions {shell} lacks {marker:?}:\n{out}");
        assert!(out.contains("check-config") && out.contains("deliveries"), "completions {shell} misses commands");
    }
    let out = run(Command::new(BIN).args(["completions", "tcsh"]));
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("bash, zsh, fish"), "{}", stderr(&out));
}

/// dpkg operating on its own database under `root`, as on a host whose root is `root`. The
/// maintainer scripts run outside a chroot, with DPKG_ROOT set (the root has no /bin/sh).
fn dpkg(root: &Path, args: &[&str]) -> Output {
    require("dpkg", "dpkg");
    run(Command::new("dpkg")
        .arg(format!("--root={}", root.display()))
        .args(["--force-script-chrootless", "--force-depends", "--force-confold"])
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

/// The package again as version `version`, content unchanged.
fn repackaged(deb: &Path, version: &str, dir: &Path) -> PathBuf {
    let tree = dir.join("tree");
    ok(Command::new("dpkg-deb").arg("-R").arg(deb).arg(&tree));
    let control = tree.join("DEBIAN/control");
    let text = std::fs::read_to_string(&control).expect("control");
    let text: String = text
        .lines()
        .map(|l| if l.starts_with("Version: ") { format!("Version: {version}\n") } else { format!("{l}\n") })
        .collect();
    std::fs::write(&control, text).expect("write control");
    let out = dir.join(format!("policy-audit_{version}.deb"));
    ok(Command::new("dpkg-deb").args(["-Zgzip", "-z1", "-b"]).arg(&tree).arg(&out));
    out
}

#[test]
fn an_upgrade_keeps_the_administrators_edited_config() {
    let root = tempfile::tempdir().expect("temp root");
    let admin = root.path().join("var/lib/dpkg");
    std::fs::create_dir_all(admin.join("updates")).expect("dpkg admin dir");
    std::fs::create_dir_all(admin.join("info")).expect("dpkg info dir");
    std::fs::write(admin.join("status"), "").expect("dpkg status");

    let out = dpkg(root.path(), &["--install", &deb().display().to_string()]);
    assert!(out.status.success(), "dpkg --install: {}{}", stdout(&out), stderr(&out));
    let config = root.path().join("etc/policy-audit/config.toml");
    let secrets = root.path().join("etc/default/policy-audit");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&secrets).expect("secrets").permissions().mode() & 0o777, 0o600);
    let edited = std::fs::read_to_string(&config).expect("installed config").replace(
        "url = \"https://gitlab.example.com/acme/security-policies.git\"",
        "url = \"https://gitlab.internal/acme/security-policies.git\"",
    );
    std::fs::write(&config, &edited).expect("edit config");
    std::fs::write(&secrets, "GITLAB_TOKEN=glpat-admin\n").expect("edit secrets");

    let work = tempfile::tempdir().expect("temp dir");
    let newer = repackaged(deb(), "999.0.0-1", work.path());
    let out = dpkg(root.path(), &["--install", &newer.display().to_string()]);
    assert!(out.status.success(), "dpkg --install (upgrade): {}{}", stdout(&out), stderr(&out));
    let status = ok(Command::new("dpkg-query").arg(format!("--admindir={}", admin.display())).args([
        "-W",
        "-f",
        "${Version} ${Status}",
        "policy-audit",
    ]));
    assert_eq!(status, "999.0.0-1 install ok installed");
    assert_eq!(std::fs::read_to_string(&config).expect("config after upgrade"), edited);
    assert_eq!(std::fs::read_to_string(&secrets).expect("secrets after upgrade"), "GITLAB_TOKEN=glpat-admin\n");
    assert_eq!(std::fs::metadata(&secrets).expect("secrets").permissions().mode() & 0o777, 0o600);

    // Removing the package (not purging) keeps the configuration too.
    let out = dpkg(root.path(), &["--remove", "policy-audit"]);
    assert!(out.status.success(), "dpkg --remove: {}{}", stdout(&out), stderr(&out));
    assert!(!root.path().join("usr/bin/policy-audit").exists());
    assert_eq!(std::fs::read_to_string(&config).expect("config after remove"), edited);
}

/// Runs each maintainer script of the package the way dpkg calls it, in a private mount
/// namespace where /run/systemd/system exists (or not: `booted`), with `systemctl` and
/// `deb-systemd-invoke` replaced by loggers. Returns what each call invoked.
fn maintainer_script_calls(booted: bool, calls: &[(&str, &str)]) -> String {
    require("unshare", "util-linux");
    let control = tempfile::tempdir().expect("temp dir");
    ok(Command::new("dpkg-deb").arg("--control").arg(deb()).arg(control.path()));
    let fake = control.path().join("fake-bin");
    std::fs::create_dir_all(&fake).expect("fake bin");
    let log = control.path().join("calls.log");
    for tool in ["systemctl", "deb-systemd-invoke", "deb-systemd-helper"] {
        let path = fake.join(tool);
        std::fs::write(&path, format!("#!/bin/sh\necho \"{tool} $*\" >> '{}'\n", log.display())).expect("fake tool");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    let mut program = String::from("set -e\nmount -t tmpfs tmpfs /run\n");
    if booted {
        program.push_str("mkdir -p /run/systemd/system\n");
    }
    for (script, arg) in calls {
        let path = control.path().join(script);
        program.push_str(&format!("echo '== {script} {arg}' >> '{}'\n", log.display()));
        program.push_str(&format!("'{}' {arg}\n", path.display()));
    }
    let path = format!("{}:{}", fake.display(), std::env::var("PATH").unwrap_or_default());
    let out =
        run(Command::new("unshare").args(["--mount", "sh", "-c", &program]).env("PATH", path).env_remove("DPKG_ROOT"));
    assert!(out.status.success(), "maintainer scripts (needs unshare --mount, i.e. root): {}", stderr(&out));
    std::fs::read_to_string(&log).unwrap_or_default()
}

#[test]
fn maintainer_scripts_reload_systemd_and_never_start_or_enable_anything() {
    let lifecycle = [
        ("postinst", "configure"),
        ("prerm", "upgrade 0.1.0-1"),
        ("postinst", "configure 0.1.0-1"),
        ("prerm", "remove"),
        ("postrm", "remove"),
        ("postrm", "purge"),
    ];
    let log = maintainer_script_calls(true, &lifecycle);
    assert_eq!(
        log,
        "== postinst configure\n\
         systemctl --system daemon-reload\n\
         == prerm upgrade 0.1.0-1\n\
         == postinst configure 0.1.0-1\n\
         systemctl --system daemon-reload\n\
         == prerm remove\n\
         deb-systemd-invoke stop policy-audit-reconcile.timer policy-audit-reconcile.service policy-audit.service\n\
         == postrm remove\n\
         systemctl --system daemon-reload\n\
         == postrm purge\n\
         systemctl --system daemon-reload\n"
    );
    // Without a running systemd (a container, a chroot) they touch nothing.
    let log = maintainer_script_calls(false, &lifecycle);
    assert!(!log.lines().any(|l| !l.starts_with("== ")), "{log}");
}
