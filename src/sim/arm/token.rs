//! The token endpoint and the bearer tokens it issues: JWT-shaped, with an `exp` the
//! emulator enforces for the tokens it issued.

use super::*;

pub(super) fn bearer(headers: &HeaderMap) -> Option<String> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(str::to_owned)
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// ARM's answer to a token the emulator issued whose `exp` has passed (401
/// `ExpiredAuthenticationToken`). Tokens it did not issue (fixed test tokens) are accepted.
pub(super) fn expired(s: &Shared, token: &str) -> Option<Response> {
    let mut w = s.lock();
    let exp = w.tokens.issued.get(token)?.exp;
    let now = unix_now();
    // `exp` has a resolution of one second, like `expires_in`: the token is good through it.
    if now <= exp {
        return None;
    }
    w.tokens.expired_rejections += 1;
    w.count("unauthorized");
    let mut rsp = error(
        StatusCode::UNAUTHORIZED,
        "ExpiredAuthenticationToken",
        &format!(
            "The access token expiry UTC time '{exp}' is earlier than current UTC time '{now}'."
        ),
    );
    set_header(
        &mut rsp,
        "www-authenticate",
        "Bearer authorization_uri=\"https://login.windows.net/\", error=\"invalid_token\", error_description=\"The access token has expired.\"",
    );
    Some(rsp)
}

/// Base64url without padding, as JWT segments use.
fn b64url(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            out.push(char::from(A[((n >> (18 - 6 * i)) & 63) as usize]));
        }
    }
    out
}

/// A JWT-shaped access token (header, claims with `exp` and the client ID in `appid`,
/// signature) like Entra ID's.
fn access_token(n: u64, lifetime: u64, client_id: &str, tenant: &str) -> (String, u64) {
    let iat = unix_now();
    let exp = iat + lifetime;
    let header = b64url(br#"{"typ":"JWT","alg":"RS256","kid":"sim"}"#);
    let claims = b64url(
        json!({"aud": "https://management.azure.com/", "iss": format!("https://sts.windows.net/{tenant}/"), "tid": tenant, "appid": client_id, "iat": iat, "nbf": iat, "exp": exp, "jti": format!("sim-token-{n}")})
            .to_string()
            .as_bytes(),
    );
    let signature = b64url(&fingerprint_u64(&format!("{header}.{claims}")).to_be_bytes());
    (format!("{header}.{claims}.{signature}"), exp)
}

/// The token endpoint of `tenant` (`/{tenant}/oauth2/v2.0/token`).
pub(super) fn token(s: &Shared, tenant: &str, body: &[u8]) -> Response {
    let form: HashMap<String, String> = serde_urlencoded::from_bytes(body).unwrap_or_default();
    let credential = form
        .get("client_assertion")
        .or_else(|| form.get("client_secret"));
    let (Some(credential), Some(client)) = (credential, form.get("client_id")) else {
        return json_response(
            StatusCode::BAD_REQUEST,
            &json!({"error": "invalid_request", "error_description": "client_id and a client assertion or secret are required"}),
        );
    };
    let mut w = s.lock();
    w.tokens.count += 1;
    let fp = format!("{:016x}", fingerprint_u64(credential));
    w.tokens.credential_fingerprints.push(fp);
    let lifetime = w.timing.token_lifetime.as_secs();
    let n = w.tokens.count;
    let (token, exp) = access_token(n, lifetime, client, tenant);
    w.tokens.issued.insert(
        token.clone(),
        Issued {
            exp,
            client_id: client.clone(),
        },
    );
    json_response(
        StatusCode::OK,
        &json!({"token_type": "Bearer", "expires_in": lifetime, "ext_expires_in": lifetime, "access_token": token}),
    )
}
