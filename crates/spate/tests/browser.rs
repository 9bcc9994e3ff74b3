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
