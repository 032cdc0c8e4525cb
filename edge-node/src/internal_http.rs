//! The HTTP client the fleet's own parts talk to each other with: the edge's shadow filler
//! (through its own listener) and peer-fetch server, the broker's health checker and its
//! calls to the edges' admin APIs.

/// A builder for a client between the fleet's own parts; each caller adds its timeouts.
/// No proxy from the environment: the parts talk directly. Redirects are never followed: a
/// redirect is an answer to relay or to cache, and followed it would carry the fleet's
/// internal headers (the shadow-fill secret, the admin token) to wherever an origin or a
/// misbehaving edge pointed.
pub fn client() -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
}
