//! Headless Chromium (Debian's package, driven by playwright-core from npm) against the example
//! page `/examples/live`: live events, resume after a reload, filters, no console errors. The
//! program is `tests/interop/live_page.js`; `scripts/test` installs Chromium and playwright-core.

mod common;

#[test]
fn the_live_example_page_shows_events_and_resumes_after_a_reload() {
    let dir = tempfile::tempdir().unwrap();
    let server = common::start(dir.path(), &[]);
    let stdout = common::interop("node", "live_page.js", &[&server.url]);
    assert!(stdout.contains("\"ok\":true"), "{stdout}");
    assert_eq!(server.terminate().code(), Some(0));
}

/// The web console at `/`, end to end in headless Chromium (`tests/interop/console.js`): a topic
/// created, an event published and seen in the live tail, then filtered out with CEL; a
/// subscription whose webhook fails dead-letters its messages, redriven from the UI; a projection
/// and a threshold rule made with the builder, a row updating live and an alert raised. A
/// screenshot of each page is saved under the target directory (printed).
#[test]
fn the_console_drives_topics_subscriptions_projections_and_detectors() {
    let dir = tempfile::tempdir().unwrap();
    let server = common::start_env(dir.path(), &[], &[("SPATE_METRICS_INTERVAL_MS", "1000")]);
    let shots = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("console-screenshots");
    let stdout = common::interop(
        "node",
        "console.js",
        &[&server.url, shots.to_str().unwrap()],
    );
    assert!(stdout.contains("\"ok\":true"), "{stdout}");
    println!("{stdout}\nscreenshots in {}", shots.display());
    for page in [
        "overview",
        "topics",
        "topic",
        "streams",
        "subscriptions",
        "subscription",
        "projections",
        "projection",
        "detectors",
        "detector",
        "builders",
    ] {
        let png = shots.join(format!("{page}.png"));
        let size = std::fs::metadata(&png).map(|m| m.len()).unwrap_or(0);
        assert!(size > 1000, "no screenshot of {page} at {}", png.display());
    }
    assert_eq!(server.terminate().code(), Some(0));
}

/// Every page of the console in headless Firefox (Debian's firefox-esr over WebDriver BiDi,
/// `tests/interop/console_firefox.js`): it renders, goes live, tails a published event, and no
/// console or page error happens.
#[test]
fn the_console_works_in_firefox() {
    let dir = tempfile::tempdir().unwrap();
    let server = common::start(dir.path(), &[]);
    let shots = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("console-screenshots");
    let stdout = common::interop(
        "node",
        "console_firefox.js",
        &[&server.url, shots.to_str().unwrap()],
    );
    assert!(stdout.contains("\"ok\":true"), "{stdout}");
    println!("{stdout}");
    for page in ["overview", "topics", "topic", "streams", "builders"] {
        let png = shots.join(format!("{page}-firefox.png"));
        assert!(
            std::fs::metadata(&png).is_ok_and(|m| m.len() > 1000),
            "no screenshot {}",
            png.display()
        );
    }
    assert_eq!(server.terminate().code(), Some(0));
}

/// A server with access tokens, in headless Chromium (`tests/interop/console_token.js`): the
/// console takes the token from its address (`/#token=`) or asks for it, its WebSocket carries
/// it, and the example page follows a topic with `?token=`.
#[test]
fn the_console_and_the_example_page_work_with_access_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    let token = "browser-token-0123456789";
    std::fs::write(&tokens, format!("{token}\n")).unwrap();
    let server = common::start(
        &dir.path().join("data"),
        &["--auth-tokens-file", tokens.to_str().unwrap()],
    );
    let stdout = common::interop("node", "console_token.js", &[&server.url, token]);
    assert!(stdout.contains("\"ok\":true"), "{stdout}");
    assert_eq!(server.terminate().code(), Some(0));
}
