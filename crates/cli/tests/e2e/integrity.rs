//! What the control plane stores is what it says it stores: concurrent
//! pushes never share a temporary file, a blob always hashes to its name,
//! and names and versions are checked and normalised before they are kept.

use rollwave::fleet::{Fleet, FleetSpec};
use sha2::{Digest, Sha256};

use crate::harness::*;

fn sha256(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
}

/// An executable artifact of about 3 MB, different for each `seed`.
fn artifact(seed: u32) -> Vec<u8> {
    let mut bytes = b"#!/bin/sh\nexit 0\n".to_vec();
    let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    bytes.extend((0..3 << 20).map(|_| {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        x as u8
    }));
    bytes
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_pushes_store_only_blobs_that_match_their_names() {
    let fleet = Fleet::launch(FleetSpec::new(exe().into(), 0))
        .await
        .unwrap();
    let http = fleet.http();
    let url = fleet.url();
    let bodies: Vec<Vec<u8>> = (0..8).map(artifact).collect();
    // Pushes at once: the same bytes to one version, the same bytes
    // to two versions, and different bytes to two versions.
    for round in 0..60u32 {
        let a = &bodies[(round % 8) as usize];
        let b = if round % 3 == 2 {
            &bodies[((round + 1) % 8) as usize]
        } else {
            a
        };
        let (va, vb) = if round % 3 == 0 {
            (format!("1.{round}.0"), format!("1.{round}.0"))
        } else {
            (format!("2.{round}.0"), format!("3.{round}.0"))
        };
        let push = |version: String, body: Vec<u8>| {
            let http = http.clone();
            let url = format!("{url}/v1/releases/api/{version}");
            async move {
                let r = http.post(url).body(body).send().await.unwrap();
                let status = r.status().as_u16();
                (status, r.text().await.unwrap())
            }
        };
        // Each pair twice over, all at once: more chances for two uploads
        // to begin in the same instant.
        let results = futures_util::future::join_all([
            push(va.clone(), a.clone()),
            push(vb.clone(), b.clone()),
            push(va, a.clone()),
            push(vb, b.clone()),
        ])
        .await;
        for (status, body) in results {
            assert!(
                status == 200 || status == 201,
                "round {round}: a push got {status}: {body}"
            );
        }
    }
    let blobs = fleet.dir.join("server-data").join("blobs");
    let mut checked = 0;
    for entry in std::fs::read_dir(&blobs).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_dir() {
            continue;
        }
        let name = entry.file_name().into_string().unwrap();
        let content = std::fs::read(entry.path()).unwrap();
        assert_eq!(
            sha256(&content),
            name,
            "blob {name} does not hash to its name"
        );
        checked += 1;
    }
    assert!(checked >= 8, "only {checked} blobs stored");
    // Nothing left behind in the upload area.
    assert_eq!(std::fs::read_dir(blobs.join("tmp")).unwrap().count(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_corrupt_blob_is_never_served_and_a_push_repairs_it() {
    let mut fleet = Fleet::launch(FleetSpec::new(exe().into(), 0))
        .await
        .unwrap();
    let http = fleet.http();
    let url = fleet.url();
    let body = artifact(1);
    let sha = sha256(&body);
    let r = http
        .post(format!("{url}/v1/releases/api/1.0.0"))
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    // The disk loses part of it, behind the server's back.
    let blob = fleet.dir.join("server-data").join("blobs").join(&sha);
    std::fs::write(&blob, &body[..1000]).unwrap();
    // The push of the same bytes finds the release unchanged but puts the
    // right content back.
    let r = http
        .post(format!("{url}/v1/releases/api/1.0.0"))
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    assert_eq!(std::fs::read(&blob).unwrap(), body);
    let got = http
        .get(format!("{url}/v1/releases/api/1.0.0/artifact"))
        .send()
        .await
        .unwrap();
    assert_eq!(got.status(), 200);
    assert_eq!(got.bytes().await.unwrap().as_ref(), body.as_slice());

    // A blob that went bad before it was first served (in this server's
    // run) is refused, with a JSON error.
    let other = artifact(2);
    let sha = sha256(&other);
    let r = http
        .post(format!("{url}/v1/releases/api/2.0.0"))
        .body(other.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    fleet.restart_server().await.unwrap();
    let blob = fleet.dir.join("server-data").join("blobs").join(&sha);
    std::fs::write(&blob, &other[..1000]).unwrap();
    let got = http
        .get(format!("{url}/v1/releases/api/2.0.0/artifact"))
        .send()
        .await
        .unwrap();
    assert_eq!(got.status(), 500);
    let text = got.text().await.unwrap();
    assert!(text.contains("is corrupt"), "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn versions_and_names_are_checked_and_stored_normalised() {
    let fleet = Fleet::launch(FleetSpec::new(exe().into(), 0))
        .await
        .unwrap();
    let http = fleet.http();
    let url = fleet.url();
    let body = artifact(3);
    let post = |path: String| {
        let http = http.clone();
        let body = body.clone();
        let url = format!("{url}{path}");
        async move {
            let r = http.post(url).body(body).send().await.unwrap();
            let status = r.status().as_u16();
            let json: serde_json::Value = r.json().await.unwrap();
            (status, json)
        }
    };
    // Surrounding whitespace is not part of the version.
    let (status, json) = post("/v1/releases/api/%202.0.0%0A".into()).await;
    assert_eq!(status, 201, "{json}");
    assert_eq!(json["release"]["version"], "2.0.0");
    let got = http
        .get(format!("{url}/v1/releases/api/2.0.0"))
        .send()
        .await
        .unwrap();
    assert_eq!(got.status(), 200);

    let long = format!("1.0.0-{}", "a".repeat(8000));
    for (path, field) in [
        (format!("/v1/releases/api/{long}"), "version: "),
        ("/v1/releases/api/2.0.0%2F..".into(), "version: "),
        ("/v1/releases/api/two".into(), "version: "),
        ("/v1/releases/a%20pi/2.0.0".into(), "service: "),
        (
            format!("/v1/releases/{}/2.0.0", "a".repeat(65)),
            "service: ",
        ),
    ] {
        let (status, json) = post(path.clone()).await;
        assert_eq!(status, 400, "{path}: {json}");
        assert_eq!(json["error"]["code"], "bad_request", "{path}: {json}");
        let message = json["error"]["message"].as_str().unwrap();
        assert!(message.starts_with(field), "{path}: {message}");
    }
    // The same rules where a rollout names a release.
    let r = http
        .post(format!("{url}/v1/rollouts"))
        .json(&serde_json::json!({"spec": {"service": "api", "version": long}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let json: serde_json::Value = r.json().await.unwrap();
    assert!(
        json["error"]["message"]
            .as_str()
            .unwrap()
            .contains("version: 8006 bytes is longer than the limit of 128"),
        "{json}"
    );
    let listed: serde_json::Value = http
        .get(format!("{url}/v1/releases"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let versions: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["version"].as_str().unwrap())
        .collect();
    assert_eq!(versions, ["2.0.0"]);
}
