//! The page's sign-in and pages as a browser asks for them over HTTP,
//! without a browser: cookies and hidden fields read from the answers.

/// A client that shows redirects instead of following them.
pub fn no_redirects() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

/// The value of the first hidden `csrf` field of a page.
pub fn csrf_field(html: &str) -> String {
    html.split("name=\"csrf\" value=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap_or_else(|| panic!("no csrf field: {html}"))
        .to_string()
}

/// The cookie an answer sets whose `name=` begins it, as a request sends
/// it back (`name=value`).
pub fn set_cookie(answer: &reqwest::Response, name: &str) -> Option<String> {
    answer
        .headers()
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap())
        .find(|c| c.starts_with(name))
        .map(|c| c.split(';').next().unwrap().to_string())
}

/// Tries to sign in at `url` with `token` as a browser does: the sign-in
/// form's cookie and hidden field, then the form, with the browser's
/// session cookie if it holds one. The answer, whatever it is.
pub async fn sign_in_attempt(
    http: &reqwest::Client,
    url: &str,
    token: &str,
    holding: Option<&str>,
) -> reqwest::Response {
    let form = http.get(url).send().await.unwrap();
    let sign_in_cookie = set_cookie(&form, "licensor_sign_in=").expect("the sign-in form's cookie");
    let csrf = csrf_field(&form.text().await.unwrap());
    let cookies = match holding {
        Some(session) => format!("{sign_in_cookie}; {session}"),
        None => sign_in_cookie,
    };
    http.post(format!("{url}/sign-in"))
        .header("cookie", cookies)
        .form(&[("token", token), ("csrf", csrf.as_str())])
        .send()
        .await
        .unwrap()
}

/// Signs in (303); the new session cookie (`licensor_session=...`).
pub async fn sign_in_over_http(
    http: &reqwest::Client,
    url: &str,
    token: &str,
    holding: Option<&str>,
) -> String {
    let signed_in = sign_in_attempt(http, url, token, holding).await;
    assert_eq!(signed_in.status(), 303);
    set_cookie(&signed_in, "licensor_session=").expect("a session cookie")
}

/// The page at `url` as the browser holding `session` sees it.
pub async fn page_of(http: &reqwest::Client, url: &str, session: &str) -> String {
    http.get(url)
        .header("cookie", session)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}
