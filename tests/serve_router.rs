//! The library's router driven in-process with `tower::ServiceExt::oneshot`: no binary, no
//! port. A prediction against the libtorch engine, refusals with their status and one-line
//! reason, the body limit and how much of a larger body it reads, the icon, the classic
//! convolution, and the note of an app without its test set. Needs MNIST in data/mnist.

mod support;

use axum::body::{Body, Bytes, HttpBody};
use axum::http::{header, HeaderMap, Request, StatusCode};
use axum::Router;
use lenet5::data::handwriting::{self, Gray};
use lenet5::data::DatasetKind;
use lenet5::inference::{LoadOptions, Model};
use lenet5::serve::{self, App, ServeConfig, MAX_BODY_BYTES, MAX_DRAIN_BYTES};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use tower::ServiceExt;

fn config(data: Option<PathBuf>) -> ServeConfig {
    ServeConfig { model: support::model(), load: LoadOptions::default(), dataset: DatasetKind::Mnist, data }
}

/// The router of the tests' model (`support::model`) with the test set, loaded once for all.
fn router() -> Router {
    static ROUTER: OnceLock<Router> = OnceLock::new();
    ROUTER
        .get_or_init(|| {
            let app = App::load(&config(None)).expect("the model and data/mnist load");
            assert_eq!(app.notes(), Vec::<String>::new(), "with the test set, nothing is off");
            serve::router(Arc::new(app))
        })
        .clone()
}

/// Status, headers and body of one request through `router`.
async fn send(router: Router, request: Request<Body>) -> (StatusCode, HeaderMap, Bytes) {
    let response = router.oneshot(request).await.expect("the router's error type is Infallible");
    let (parts, body) = response.into_parts();
    (parts.status, parts.headers, axum::body::to_bytes(body, usize::MAX).await.expect("the answer is read"))
}

fn get(path: &str) -> Request<Body> {
    Request::get(path).body(Body::empty()).unwrap()
}

fn post(path: &str, content_type: &str, body: impl Into<Body>) -> Request<Body> {
    Request::post(path).header(header::CONTENT_TYPE, content_type).body(body.into()).unwrap()
}

fn json_of(body: &Bytes) -> Value {
    serde_json::from_slice(body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(body)))
}

#[tokio::test]
async fn a_prediction_is_the_libtorch_engines_on_the_same_preprocessed_digit() {
    let (images, labels) = support::mnist_test();
    let rows: Vec<&[u8]> = images[0].chunks(28).collect();
    let (status, _, body) =
        send(router(), post("/api/predict", "application/json", json!({ "pixels": rows }).to_string())).await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    let answer = json_of(&body);
    assert_eq!((answer["prediction"].clone(), answer["engine"].clone()), (json!(labels[0]), json!("direct")));
    // The same grey values prepared here and run through libtorch (the router runs the direct
    // engine): the same probabilities within 1e-5, as the two sum in different orders.
    let gray = Gray::from_fn(28, 28, |x, y| images[0][(y * 28 + x) as usize] as f32 / 255.0);
    let prepared = handwriting::prepare(&gray, "test image 0").unwrap();
    let classifier = Model::load(&support::model(), &LoadOptions::default(), tch::Device::Cpu).unwrap();
    let norm = classifier.card().expect("the model has its card").input.normalization;
    let expected =
        lenet5::inference::predict::predict(&classifier, &prepared.tensor(norm)).unwrap().remove(0).probabilities;
    let got: Vec<f64> = answer["probabilities"].as_array().unwrap().iter().map(|p| p.as_f64().unwrap()).collect();
    assert_eq!(got.len(), 10);
    for (c, (a, b)) in got.iter().zip(&expected).enumerate() {
        assert!((a - b).abs() < 1e-5, "class {c}: {a} served, {b} from libtorch");
    }
}

#[tokio::test]
async fn refusals_have_their_status_and_a_one_line_reason() {
    let grey = json!({ "pixels": vec![vec![0; 28]; 27] }).to_string();
    let ragged = json!({ "input": [[1, 2], [3]], "preset": "edge" }).to_string();
    let cases = [
        (
            post("/api/predict", "application/json", grey),
            StatusCode::BAD_REQUEST,
            "pixels: 27 rows; expected 28 rows of 28 grey values (0-255)",
        ),
        (
            post("/api/conv", "application/json", ragged),
            StatusCode::BAD_REQUEST,
            "input: row 2 has 1 values, but row 1 has 2",
        ),
        (get("/api/test-images/10000"), StatusCode::NOT_FOUND, "test image 10000: the test set has images 0 to 9999"),
        (get("/nowhere"), StatusCode::NOT_FOUND, "no such page or API route (see GET /)"),
    ];
    for (request, status, reason) in cases {
        let path = request.uri().to_string();
        let (got, headers, body) = send(router(), request).await;
        assert_eq!(got, status, "{path}");
        assert_eq!(headers[header::CONTENT_TYPE], "application/json", "{path}");
        assert_eq!(json_of(&body), json!({ "error": reason }), "{path}");
    }
}

#[tokio::test]
async fn a_body_at_the_limit_reaches_the_handler_and_one_byte_more_gets_413_and_close() {
    let (status, _, body) = send(router(), post("/api/predict", "image/png", vec![0u8; MAX_BODY_BYTES])).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(json_of(&body)["error"].as_str().unwrap().starts_with("the body: not an image"), "{}", json_of(&body));
    let (status, headers, body) =
        send(router(), post("/api/predict", "image/png", vec![0u8; MAX_BODY_BYTES + 1])).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(headers[header::CONNECTION], "close");
    assert_eq!(
        json_of(&body),
        json!({ "error": format!("the body is larger than the limit of {MAX_BODY_BYTES} bytes") })
    );
}

/// A body that never ends, counting the bytes taken from it.
struct Endless(Arc<AtomicUsize>);

impl HttpBody for Endless {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        const CHUNK: &[u8] = &[0; 64 << 10];
        self.0.fetch_add(CHUNK.len(), Ordering::Relaxed);
        Poll::Ready(Some(Ok(http_body::Frame::data(Bytes::from_static(CHUNK)))))
    }
}

#[tokio::test]
async fn an_oversize_body_is_read_no_further_than_the_drain_bound() {
    // Streamed without a length: read to just past the bound, then refused.
    let taken = Arc::new(AtomicUsize::new(0));
    let (status, headers, _) =
        send(router(), post("/api/predict", "image/png", Body::new(Endless(taken.clone())))).await;
    assert_eq!((status, &headers[header::CONNECTION]), (StatusCode::PAYLOAD_TOO_LARGE, &"close".parse().unwrap()));
    let taken = taken.load(Ordering::Relaxed);
    assert!(taken > MAX_DRAIN_BYTES && taken <= MAX_DRAIN_BYTES + (64 << 10), "{taken} bytes read of an endless body");
    // Declared longer than the bound: refused before a byte is read.
    let untouched = Arc::new(AtomicUsize::new(0));
    let mut request = post("/api/predict", "image/png", Body::new(Endless(untouched.clone())));
    request.headers_mut().insert(header::CONTENT_LENGTH, (MAX_DRAIN_BYTES + 1).into());
    let (status, _, _) = send(router(), request).await;
    assert_eq!((status, untouched.load(Ordering::Relaxed)), (StatusCode::PAYLOAD_TOO_LARGE, 0));
}

#[tokio::test]
async fn the_icon_is_served_and_the_page_names_it() {
    let (status, headers, body) = send(router(), get("/favicon.ico")).await;
    assert_eq!((status, &headers[header::CONTENT_TYPE]), (StatusCode::OK, &"image/svg+xml".parse().unwrap()));
    assert!(body.starts_with(b"<svg xmlns=\"http://www.w3.org/2000/svg\""), "{}", String::from_utf8_lossy(&body));
    let (_, _, page) = send(router(), get("/")).await;
    assert!(String::from_utf8_lossy(&page).contains(r#"<link rel="icon" href="/favicon.ico" type="image/svg+xml">"#));
}

#[tokio::test]
async fn the_classic_convolution_is_4_3_4_2_4_3_2_3_4() {
    let (status, _, body) = send(router(), get("/api/conv")).await;
    assert_eq!(status, StatusCode::OK);
    let walk = json_of(&body);
    assert_eq!(walk["output"], json!([[4.0, 3.0, 4.0], [2.0, 4.0, 3.0], [2.0, 3.0, 4.0]]));
    assert_eq!(walk["libtorch_max_difference"], json!(0.0));
}

#[tokio::test]
async fn without_its_test_set_the_app_says_so_and_the_picker_routes_answer_503() {
    let missing = support::temp_dir("serve-router-no-data").join("absent");
    let app = App::load(&config(Some(missing.clone()))).expect("the app loads without its test set");
    let notes = app.notes();
    assert_eq!(notes.len(), 1, "{notes:?}");
    assert!(
        notes[0].starts_with("the page's test-image picker is off: ") && notes[0].contains(missing.to_str().unwrap()),
        "{notes:?}"
    );
    let (status, _, body) = send(serve::router(Arc::new(app)), get("/api/test-images")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    let reason = json_of(&body)["error"].as_str().unwrap().to_string();
    assert!(reason.starts_with("no test images: ") && !reason.contains('\n'), "{reason}");
}
