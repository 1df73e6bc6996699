//! Signed releases with real agents that trust one key: what the control
//! plane serves is installed only if the key's owner signed it for that
//! release; anything else is refused on the node before it is unpacked,
//! saying why, and the fleet keeps running what it ran.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Output;

use rollwave::demo_service::{tarball, DemoRelease};
use rollwave::fleet::{Fleet, FleetSpec};
use rollwave_core::Release;

use crate::harness::*;

/// A key pair made by `rollwave keys generate`.
struct KeyPair {
    secret: PathBuf,
    public: PathBuf,
    id: String,
}

fn generate(dir: &Path, name: &str) -> KeyPair {
    let out = rollwave(&[
        "keys",
        "generate",
        "--dir",
        &dir.display().to_string(),
        "--name",
        name,
    ]);
    let stdout = ok(&out);
    let id = stdout
        .lines()
        .find_map(|l| l.strip_prefix("key id"))
        .map(|id| id.trim().to_string())
        .unwrap_or_else(|| panic!("no key id in {stdout}"));
    KeyPair {
        secret: dir.join(format!("{name}.key")),
        public: dir.join(format!("{name}.pub")),
        id,
    }
}

fn rollwave(args: &[&str]) -> Output {
    std::process::Command::new(exe())
        .args(args)
        .output()
        .unwrap()
}

/// Stdout of a command that must have succeeded.
fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

/// Writes a healthy demo release of `version` beside the fleet.
fn artifact(fleet: &Fleet, version: &str) -> PathBuf {
    let bytes = tarball(&DemoRelease {
        version: version.into(),
        healthy: true,
        broken_on: Vec::new(),
        error_rate: 0.0,
    })
    .unwrap();
    let path = fleet.dir.join(format!("api-{version}.tar.gz"));
    std::fs::write(&path, bytes).unwrap();
    path
}

/// `rollwave release push api VERSION FILE ARGS...`.
fn push_file(fleet: &Fleet, version: &str, file: &Path, args: &[&str]) -> Output {
    let file = file.display().to_string();
    let mut all = vec!["release", "push", SERVICE, version, &file];
    all.extend_from_slice(args);
    cli(fleet, &all)
}

/// Rolls out `version` to the whole fleet; returns whether it completed.
async fn roll(fleet: &Fleet, version: &str) -> rollwave_core::Rollout {
    let r = start(fleet, version, |s| s.min_healthy_time = Some("0s".into()))
        .await
        .unwrap();
    wait_done(fleet, r.id).await
}

/// A rollout of `version` fails on its first node with `reason`, and no node
/// unpacked it, kept the download, or left 1.0.0.
async fn refused(fleet: &Fleet, version: &str, reason: &str) {
    let r = roll(fleet, version).await;
    assert!(!r.fully_upgraded(), "{r:#?}");
    let first = &r.nodes[&r.batches[0][0]];
    let got = first.reason.as_deref().unwrap_or_default();
    assert_eq!(
        got,
        format!("release {version} not installed: {reason}"),
        "{r:#?}"
    );
    for node in &fleet.nodes {
        let releases = node
            .state_dir
            .join("services")
            .join(SERVICE)
            .join("releases");
        assert!(
            !releases.join(version).exists(),
            "{} unpacked {version}",
            node.name
        );
        // Every node got a stage task at the start; each deletes its
        // download once refused.
        wait_until(&format!("{} to delete its download", node.name), || {
            let releases = releases.clone();
            async move {
                let left = std::fs::read_dir(&releases)
                    .unwrap()
                    .flatten()
                    .any(|e| e.file_name().to_string_lossy().starts_with(".download"));
                (!left).then_some(())
            }
        })
        .await;
    }
    assert_fleet_on(fleet, "1.0.0").await;
}

async fn release(fleet: &Fleet, version: &str) -> Release {
    fleet
        .api()
        .unwrap()
        .get(&format!("/v1/releases/{SERVICE}/{version}"))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn agents_install_only_releases_signed_for_them_by_a_trusted_key() {
    let keys = tempfile::tempdir().unwrap();
    let owner = generate(keys.path(), "owner");
    let other = generate(keys.path(), "other");
    let fleet = Fleet::launch(FleetSpec {
        trusted_key_files: vec![owner.public.clone()],
        ..FleetSpec::new(exe().into(), 3)
    })
    .await
    .unwrap();
    let sign_owner = ["--sign-key", owner.secret.to_str().unwrap()];

    let v1 = artifact(&fleet, "1.0.0");
    let out = ok(&push_file(&fleet, "1.0.0", &v1, &sign_owner));
    assert!(
        out.contains(&format!("signed by key id {}", owner.id)),
        "{out}"
    );
    let r = roll(&fleet, "1.0.0").await;
    assert!(r.fully_upgraded(), "{r:#?}");
    assert_fleet_on(&fleet, "1.0.0").await;

    // Unsigned.
    let v2 = artifact(&fleet, "2.0.0");
    ok(&push_file(&fleet, "2.0.0", &v2, &[]));
    refused(
        &fleet,
        "2.0.0",
        &format!("unsigned (trusted: {})", owner.id),
    )
    .await;

    // Signed, by a key the agents do not trust.
    let v201 = artifact(&fleet, "2.0.1");
    let sign_other = ["--sign-key", other.secret.to_str().unwrap()];
    ok(&push_file(&fleet, "2.0.1", &v201, &sign_other));
    refused(
        &fleet,
        "2.0.1",
        &format!(
            "signed by untrusted key id {} (trusted: {})",
            other.id, owner.id
        ),
    )
    .await;

    // Signed by the owner, for another version: 1.0.0's bytes and signature,
    // as the control plane holds them, replayed as 2.0.2.
    let replayed = fleet.dir.join("1.0.0.minisig");
    let v1_signature = release(&fleet, "1.0.0").await.signatures.remove(0).text;
    std::fs::write(&replayed, v1_signature).unwrap();
    let out = push_file(
        &fleet,
        "2.0.2",
        &v1,
        &["--signature", replayed.to_str().unwrap()],
    );
    ok(&out);
    let warning = String::from_utf8_lossy(&out.stderr);
    assert!(warning.contains("does not name api@2.0.2"), "{warning}");
    refused(&fleet, "2.0.2", "signed for api@1.0.0, not api@2.0.2").await;

    // The release pushed unsigned is signed by pushing it again. A
    // signature by a key no agent trusts, added first, does not keep the
    // owner's out: a release carries every signature pushed for it.
    let out = ok(&push_file(&fleet, "2.0.0", &v2, &sign_other));
    assert!(out.contains("signature added"), "{out}");
    refused(
        &fleet,
        "2.0.0",
        &format!(
            "signed by untrusted key id {} (trusted: {})",
            other.id, owner.id
        ),
    )
    .await;
    // `release sign` adds one without uploading: never over other bytes.
    let sign = |file: &Path| {
        cli(
            &fleet,
            &[
                "release",
                "sign",
                "api@2.0.0",
                "--sign-key",
                owner.secret.to_str().unwrap(),
                "--file",
                file.to_str().unwrap(),
            ],
        )
    };
    let out = sign(&v1);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("but api@2.0.0 was pushed with sha256")
            && err.contains("not signing other bytes"),
        "{err}"
    );
    let out = ok(&sign(&v2));
    assert!(
        out.contains(&format!(
            "api@2.0.0: signature added, signed by key ids {}, {}",
            other.id, owner.id
        )),
        "{out}"
    );
    let out = cli(
        &fleet,
        &[
            "release",
            "sign",
            "api@9.9.9",
            "--signature",
            fleet.dir.join("1.0.0.minisig").to_str().unwrap(),
        ],
    );
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("release api@9.9.9 not found"), "{err}");
    // Signing again with the same key vouches for the same: no conflict.
    ok(&push_file(&fleet, "2.0.0", &v2, &sign_owner));
    let r = roll(&fleet, "2.0.0").await;
    assert!(r.fully_upgraded(), "{r:#?}");
    assert_fleet_on(&fleet, "2.0.0").await;
    for node in &fleet.nodes {
        let log = std::fs::read_to_string(node.state_dir.join("agent.log")).unwrap();
        assert!(
            log.contains("signature verified") && log.contains(&owner.id),
            "{}: {log}",
            node.name
        );
    }

    // A detached signature made elsewhere with the minisign library, as
    // `minisign -S -t "rollwave release api@3.0.0"` would.
    let v3 = artifact(&fleet, "3.0.0");
    let text = std::fs::read_to_string(&owner.secret).unwrap();
    let sk = minisign::SecretKey::from_unencrypted_box(
        minisign::SecretKeyBox::from_string(&text).unwrap(),
    )
    .unwrap();
    let bytes = std::fs::read(&v3).unwrap();
    let sig = minisign::sign(
        None,
        &sk,
        &bytes[..],
        Some("rollwave release api@3.0.0"),
        None,
    )
    .unwrap();
    let sig_file = fleet.dir.join("api-3.0.0.tar.gz.minisig");
    std::fs::write(&sig_file, sig.into_string()).unwrap();
    let out = push_file(
        &fleet,
        "3.0.0",
        &v3,
        &["--signature", sig_file.to_str().unwrap()],
    );
    assert!(ok(&out).contains(&owner.id));
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = roll(&fleet, "3.0.0").await;
    assert!(r.fully_upgraded(), "{r:#?}");
    assert_fleet_on(&fleet, "3.0.0").await;

    // What `release list` shows.
    let table = ok(&cli(&fleet, &["release", "list"]));
    let header = table.lines().next().unwrap();
    assert!(header.contains("SIGNED"), "{table}");
    let row = |v: &str| {
        table
            .lines()
            .find(|l| l.split_whitespace().nth(1) == Some(v))
            .unwrap_or_else(|| panic!("no {v} in {table}"))
            .to_string()
    };
    assert!(row("3.0.0").contains(&owner.id), "{table}");
    assert!(row("2.0.1").contains(&other.id), "{table}");
    let json = ok(&cli(&fleet, &["release", "list", "--json"]));
    let listed: Vec<serde_json::Value> = serde_json::from_str(&json).unwrap();
    let v3 = listed.iter().find(|r| r["version"] == "3.0.0").unwrap();
    assert_eq!(v3["signatures"][0]["key_id"], owner.id.as_str());
    assert!(v3["signatures"][0]["text"]
        .as_str()
        .unwrap()
        .contains("rollwave release api@3.0.0"));
    let v2 = listed.iter().find(|r| r["version"] == "2.0.0").unwrap();
    assert_eq!(v2["signatures"].as_array().unwrap().len(), 2, "{v2}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_push_with_a_malformed_signature_is_refused_naming_the_problem() {
    let fleet = Fleet::launch(FleetSpec::new(exe().into(), 0))
        .await
        .unwrap();
    let file = artifact(&fleet, "2.0.0");
    let bytes = std::fs::read(&file).unwrap();
    let url = format!("{}/v1/releases/{SERVICE}/2.0.0", fleet.url());
    let client = fleet.http();
    for (header, want) in [
        ("!!!".to_string(), "rollwave-signature header: not base64"),
        (
            // base64 of "hello"
            "aGVsbG8=".to_string(),
            "rollwave-signature header: signature is not a minisign signature: it has 1 line",
        ),
    ] {
        let resp = client
            .post(&url)
            .header("rollwave-signature", header)
            .body(bytes.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 400);
        let body: serde_json::Value = resp.json().await.unwrap();
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.starts_with(want), "{message}");
    }
    let missing = client.get(&url).send().await.unwrap();
    assert_eq!(missing.status(), 404, "a refused push stores nothing");

    // The CLI checks a signature file before uploading anything.
    let sig = fleet.dir.join("bad.minisig");
    std::fs::write(&sig, "untrusted comment: x\nnot a signature\n").unwrap();
    let out = push_file(
        &fleet,
        "2.0.0",
        &file,
        &["--signature", sig.to_str().unwrap()],
    );
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "--signature {}: signature is not a minisign signature: it has 2 lines",
            sig.display()
        )),
        "{err}"
    );
}

#[test]
fn keys_generate_refuses_to_overwrite_and_keeps_the_secret_private() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    let args = [
        "keys",
        "generate",
        "--dir",
        keys.to_str().unwrap(),
        "--name",
        "release",
    ];
    let first = ok(&rollwave(&args));
    let secret = keys.join("release.key");
    let public = keys.join("release.pub");
    let mode = std::fs::metadata(&secret).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "{}", secret.display());

    // The public key line printed is the one in the .pub file, which
    // minisign reads, and the key id is the one minisign names it by.
    let pub_text = std::fs::read_to_string(&public).unwrap();
    let key_line = first
        .lines()
        .find_map(|l| l.strip_prefix("public key"))
        .unwrap()
        .trim()
        .to_string();
    assert_eq!(pub_text.lines().nth(1), Some(key_line.as_str()), "{first}");
    let pk = minisign::PublicKey::from_base64(&key_line).unwrap();
    let id = first
        .lines()
        .find_map(|l| l.strip_prefix("key id"))
        .unwrap()
        .trim();
    assert!(pub_text.contains(id), "{pub_text} {id}");
    let sk_text = std::fs::read_to_string(&secret).unwrap();
    let sk = minisign::SecretKey::from_unencrypted_box(
        minisign::SecretKeyBox::from_string(&sk_text).unwrap(),
    )
    .unwrap();
    let sig = minisign::sign(Some(&pk), &sk, &b"x"[..], None, None);
    assert!(sig.is_ok(), "the secret key does not match the public key");

    let again = rollwave(&args);
    assert_eq!(again.status.code(), Some(2));
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(
        err.contains(&format!(
            "{} exists: pass --force to replace it",
            secret.display()
        )),
        "{err}"
    );
    assert_eq!(std::fs::read_to_string(&secret).unwrap(), sk_text, "kept");

    // Only the public key left: still refused, naming it.
    std::fs::remove_file(&secret).unwrap();
    let err = rollwave(&args);
    assert!(
        String::from_utf8_lossy(&err.stderr).contains(&format!("{} exists", public.display())),
        "{}",
        String::from_utf8_lossy(&err.stderr)
    );
    assert!(!secret.exists());

    // --force replaces both, and the new secret is private too.
    std::fs::write(&secret, "old").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut forced = args.to_vec();
    forced.push("--force");
    let second = ok(&rollwave(&forced));
    assert_ne!(second, first);
    assert_ne!(std::fs::read_to_string(&secret).unwrap(), "old");
    let mode = std::fs::metadata(&secret).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
}
