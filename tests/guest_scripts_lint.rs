//! A lint over `guest-scripts/`: every script that runs inside a customer's VM stops on the
//! first error, checks every native command's exit code, never recreates a registry key with
//! `New-Item -Force`, and prints its output contract. The lint is shown to catch the patterns
//! of the former repair scripts.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

/// Native programs whose failures PowerShell does not turn into errors.
const NATIVE: [&str; 12] = [
    "icacls", "takeown", "netstat", "reg", "wevtutil", "gpupdate", "sc", "net", "netsh",
    "certutil", "bcdedit", "cmd",
];

/// The code of a line without its comment (a `#` outside quotes starts one).
fn code(line: &str) -> &str {
    let mut quote = None;
    for (i, c) in line.char_indices() {
        match (quote, c) {
            (None, '#') => return &line[..i],
            (None, '\'' | '"') => quote = Some(c),
            (Some(q), c) if c == q => quote = None,
            _ => {}
        }
    }
    line
}

/// Whether `line` runs native program `exe` (as a command, through `&`, or named in a call
/// to the exit-code-checking wrapper).
fn runs_native(line: &str, exe: &str) -> bool {
    let lower = line.to_ascii_lowercase();
    let words: Vec<&str> = lower
        .split(|c: char| c.is_whitespace() || "(){};|".contains(c))
        .filter(|w| !w.is_empty())
        .collect();
    words.iter().enumerate().any(|(i, w)| {
        let w = w.trim_matches(|c| c == '\'' || c == '"');
        let is_exe = w == exe || w == format!("{exe}.exe");
        let at_start = i == 0 || words[i - 1] == "&" || words[i - 1] == "invoke-native";
        is_exe && at_start
    })
}

/// The lint's findings for one script.
fn lint(name: &str, text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let lines: Vec<&str> = text.lines().collect();
    if !lines
        .first()
        .is_some_and(|l| l.starts_with("# rdphealth-script: ") && l.contains(" v"))
    {
        out.push(format!(
            "{name}: first line is not `# rdphealth-script: NAME vN`"
        ));
    }
    let first_statement = lines
        .iter()
        .map(|l| code(l).trim())
        .find(|l| !l.is_empty() && !l.starts_with("param("));
    if first_statement != Some("$ErrorActionPreference = 'Stop'") {
        out.push(format!(
            "{name}: the first statement must be $ErrorActionPreference = 'Stop' (found {first_statement:?})"
        ));
    }
    for (i, raw) in lines.iter().enumerate() {
        let line = code(raw);
        let lower = line.to_ascii_lowercase();
        let n = i + 1;
        let new_item = lower
            .split_whitespace()
            .any(|w| w == "new-item" || w.ends_with("(new-item"));
        if new_item && lower.contains("-force") {
            out.push(format!(
                "{name}:{n}: New-Item -Force deletes an existing registry key with all its values"
            ));
        }
        if lower.contains("-erroraction silentlycontinue")
            && !["get-", "test-path"]
                .iter()
                .any(|read| lower.contains(read))
        {
            out.push(format!(
                "{name}:{n}: errors are silenced only on reads (Get-*, Test-Path)"
            ));
        }
        if lower.contains("$erroractionpreference = 'silentlycontinue'") {
            out.push(format!("{name}:{n}: errors must stop the script"));
        }
        for exe in NATIVE {
            if !runs_native(line, exe) {
                continue;
            }
            let wrapped = lower.contains("invoke-native");
            let checked = lines[i..lines.len().min(i + 3)]
                .iter()
                .any(|l| l.to_ascii_lowercase().contains("$lastexitcode"));
            if !wrapped && !checked {
                out.push(format!(
                    "{name}:{n}: {exe}'s exit code is not checked (use Invoke-Native or test $LASTEXITCODE)"
                ));
            }
        }
    }
    if text.to_ascii_lowercase().contains("invoke-native") {
        let wrapper = text
            .find("function Invoke-Native")
            .map(|at| &text[at..text[at..].find("\n}").map_or(text.len(), |e| at + e)]);
        if !wrapper.is_some_and(|w| w.contains("$LASTEXITCODE") && w.contains("throw")) {
            out.push(format!(
                "{name}: Invoke-Native must throw on a non-zero $LASTEXITCODE"
            ));
        }
    }
    let contract = ["'RDPHEALTH done'", "RDPHEALTH result status="];
    if !contract.iter().any(|c| text.contains(c)) {
        out.push(format!(
            "{name}: prints neither `RDPHEALTH done` nor `RDPHEALTH result status=`"
        ));
    }
    if text.contains("RDPHEALTH result status=") {
        for required in [
            "RDPHEALTH begin",
            "RDPHEALTH change",
            "RDPHEALTH failed",
            "status=failed",
            "exit 1",
        ] {
            if !text.contains(required) {
                out.push(format!("{name}: the output contract lacks `{required}`"));
            }
        }
    }
    out
}

#[test]
fn every_guest_script_passes_the_lint() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("guest-scripts");
    let mut scripts = 0;
    let mut findings = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("ps1") {
            continue;
        }
        scripts += 1;
        let text = std::fs::read_to_string(&path).unwrap();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        findings.extend(lint(&name, &text));
    }
    assert!(scripts >= 2, "the scripts were not found in {dir:?}");
    assert!(findings.is_empty(), "{findings:#?}");
}

/// The former keep-alive repair (abridged): `New-Item -Force` before every value.
const OLD_KEEPALIVE: &str = r#"# rdphealth-script: repair-listener-keepalive v1
param([string]$AllowInsecureListenerSettings = 'false')
$ErrorActionPreference = 'Stop'
function Set-Dword($Path, $Name, $Value) {
    New-Item -Path $Path -Force -ErrorAction SilentlyContinue | Out-Null
    New-ItemProperty -Path $Path -Name $Name -Value $Value -PropertyType DWord -Force | Out-Null
    "RDPHEALTH changed name=$Name value=$Value"
}
try {
    Set-Dword 'HKLM:\SYSTEM\CurrentControlSet\Control\Terminal Server\WinStations\RDP-Tcp' 'KeepAliveTimeout' 1
    'RDPHEALTH result status=ok restart=required'
} catch {
    "RDPHEALTH result status=failed detail=`"$($_.Exception.Message)`""
}
"#;

/// The former certificate repair (abridged): native commands with unchecked exit codes.
const OLD_CERTIFICATE: &str = r#"# rdphealth-script: repair-rdp-certificate v1
$ErrorActionPreference = 'Stop'
try {
    $keys = 'C:\ProgramData\Microsoft\Crypto\RSA\MachineKeys'
    icacls $keys /save $backup /t /c | Out-Null
    takeown /f $keys /a /r /d y | Out-Null
    'RDPHEALTH result status=ok restart=recommended'
} catch {
    "RDPHEALTH result status=failed detail=`"$($_.Exception.Message)`""
}
"#;

#[test]
fn the_lint_catches_the_former_scripts_defects() {
    let keepalive = lint("old-keepalive", OLD_KEEPALIVE);
    assert!(
        keepalive
            .iter()
            .any(|f| f.contains(":5: New-Item -Force deletes")),
        "{keepalive:#?}"
    );
    assert!(
        keepalive
            .iter()
            .any(|f| f.contains(":5: errors are silenced")),
        "{keepalive:#?}"
    );
    assert!(
        keepalive.iter().any(|f| f.contains("lacks `exit 1`")),
        "{keepalive:#?}"
    );
    let certificate = lint("old-certificate", OLD_CERTIFICATE);
    for exe in ["icacls", "takeown"] {
        assert!(
            certificate
                .iter()
                .any(|f| f.contains(&format!("{exe}'s exit code is not checked"))),
            "{certificate:#?}"
        );
    }
    let unchecked_wrapper = "# rdphealth-script: x v1\n$ErrorActionPreference = 'Stop'\nfunction Invoke-Native($File) {\n    & $File\n}\nInvoke-Native 'icacls.exe'\n'RDPHEALTH done'\n";
    assert!(
        lint("wrapper", unchecked_wrapper)
            .iter()
            .any(|f| f.contains("Invoke-Native must throw")),
    );
    let silent =
        "# rdphealth-script: x v1\n$ErrorActionPreference = 'SilentlyContinue'\n'RDPHEALTH done'\n";
    assert_eq!(
        lint("silent", silent).len(),
        2,
        "{:#?}",
        lint("silent", silent)
    );
    let checked = "# rdphealth-script: x v1\n$ErrorActionPreference = 'Stop'\nicacls.exe C:\\x /save y\nif ($LASTEXITCODE -ne 0) { exit 1 }\n'RDPHEALTH done'\n";
    assert!(
        lint("checked", checked).is_empty(),
        "{:#?}",
        lint("checked", checked)
    );
}
