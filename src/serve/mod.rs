//! `lenet5 serve`: a local web page where you draw a digit and watch every stage of LeNet-5
//! compute it, and the JSON API behind the page, as a router the shell (`cli/serve.rs`) runs.
//!
//! [`App::load`] loads what the handlers read and [`router`] builds every route. The page's
//! files (`src/serve/`) are embedded, so it works offline.
//!
//! Predictions run through the direct engine (`direct/`), after the MNIST-style
//! preprocessing of `predict` (`handwriting.rs`); the stages' activations come from the
//! libtorch model's own forward pass (`LeNet5::forward_observed`), and the convolution
//! walkthrough from `conv.rs`.

use anyhow::{ensure, Context, Result};
use axum::body::{Body, Bytes, HttpBody};
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path as UrlPath, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tch::nn::VarStore;
use tch::{Device, Tensor};
use tower_http::timeout::TimeoutLayer;

use crate::data::handwriting::{self, Gray, Prepared};
use crate::data::{self, DatasetKind, Normalization};
use crate::direct::{DirectNet, LentThreads};
use crate::explain::conv::{self, Matrix, Preset};
use crate::inference::{Engine, LoadOptions, Model, NativeParts};
use crate::model::{Head, LeNet5, INPUT_SIZE};

/// Largest request body: a phone photo fits, a canvas drawing is a few KB. Larger gets 413.
pub const MAX_BODY_BYTES: usize = 8 << 20;
/// How much of a body over the limit is read, and dropped, before its 413 is sent: a client
/// that writes its whole body before it reads the answer (most do) then reads the 413, where
/// closing the connection on unread data would reset it under the client. A body declared or
/// sent beyond this gets its 413 without the rest being read.
pub const MAX_DRAIN_BYTES: usize = 4 * MAX_BODY_BYTES;
/// A request not answered in this long gets 408.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest side of a matrix `POST /api/conv` takes: a padded MNIST digit with room to spare,
/// and at most a few thousand windows written out term by term.
pub const MAX_CONV_SIDE: usize = 64;
/// Test images listed by `GET /api/test-images` unless `limit` says otherwise.
pub const DEFAULT_LIST_LIMIT: usize = 100;
/// Side of the grey values `POST /api/predict` takes as JSON: an MNIST image.
const GREY_SIDE: usize = data::IMAGE_SIZE as usize;

/// What the app needs, with no command-line types (`cli/serve.rs` fills it from the flags)
/// and no network: where it listens is the shell's business.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub model: PathBuf,
    pub load: LoadOptions,
    /// The data set of the test images, when the model's card does not say.
    pub dataset: DatasetKind,
    /// Folder of the test set's IDX files [default: the data set's].
    pub data: Option<PathBuf>,
}

/// A request that cannot be answered: the status and a one-line reason, sent as
/// `{"error": reason}`.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    fn new(status: StatusCode, message: impl std::fmt::Display) -> ApiError {
        // One line, whatever the message: anyhow's `{:#}` chain and libtorch's texts may hold more.
        let message = message.to_string().split_whitespace().collect::<Vec<_>>().join(" ");
        ApiError { status, message }
    }

    fn bad_request(err: anyhow::Error) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, format!("{err:#}"))
    }

    fn internal(err: anyhow::Error) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("{err:#}"))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(json!({ "error": self.message }))).into_response()
    }
}

/// The refusals of axum's extractors become ours, with their status.
macro_rules! from_rejections {
    ($($rejection:ty),*) => {$(
        impl From<$rejection> for ApiError {
            fn from(r: $rejection) -> ApiError {
                ApiError::new(r.status(), r.body_text())
            }
        }
    )*};
}
from_rejections!(BytesRejection, QueryRejection, PathRejection);

/// The libtorch model, for the stages' activations. Its tensors may be used by one thread at
/// a time (tch's `Tensor` is `Send`, not `Sync`), hence the mutex around it.
struct TorchModel {
    _vs: VarStore,
    net: LeNet5,
}

/// The MNIST test set as the page's picker shows it.
struct TestImages {
    /// 32x32 images in 0..=1, padded, before normalisation: `len() * 1024` values.
    pixels: Vec<f32>,
    labels: Vec<i64>,
    /// The served model's prediction for each image.
    predicted: Vec<i64>,
}

/// Everything the handlers read: the model, its card and the test set. Shared, never changed.
pub struct App {
    direct: DirectNet,
    /// libtorch's threads, lent to `direct` while the server runs.
    _lent: LentThreads,
    head: Head,
    torch: Mutex<TorchModel>,
    card: Value,
    /// conv1's weights and biases, for the page's filter pictures.
    filters: Value,
    classes: Vec<String>,
    norm: Normalization,
    /// The test set, or why it could not be read (the page works without it).
    test: Result<TestImages, String>,
    /// What loading the model noticed.
    load_notes: Vec<String>,
}

/// A tensor's values as `f32`s, with its shape less the batch dimension.
fn stage_json(name: &str, t: &Tensor) -> Result<Value> {
    let shape = t.size()[1..].to_vec();
    let values = Vec::<f32>::try_from(t.flatten(0, -1)).with_context(|| format!("reading stage {name}"))?;
    Ok(json!({ "name": name, "shape": shape, "values": values }))
}

impl App {
    /// Loads the model (direct engine), its card and, if it can be read, the test set with
    /// the model's prediction for every image.
    pub fn load(config: &ServeConfig) -> Result<App> {
        let classifier = Model::load(&config.model, &config.load, Device::Cpu)?.with_engine(Engine::Direct)?;
        let card = classifier.card().cloned();
        let load_notes = classifier.notes().to_vec();
        let dataset = card.as_ref().map(|c| c.dataset).unwrap_or(config.dataset);
        let norm = card.as_ref().map(|c| c.input.normalization).unwrap_or_else(|| dataset.normalization());
        let classes = card.as_ref().map(|c| c.classes.clone()).unwrap_or_else(|| dataset.class_names());
        let test = TestImages::load(&classifier, dataset, config.data.as_deref(), norm).map_err(|e| format!("{e:#}"));
        let Some(NativeParts { vs, net, direct: Some((direct, lent)) }) = classifier.into_parts() else {
            anyhow::bail!("{}: serve runs LeNet-5 weights in the direct engine", config.model.display());
        };
        // A model without a card is described by the card `export` would write for it.
        let card = card.unwrap_or_else(|| {
            crate::formats::card::ModelCard::new(net.config, dataset, crate::model::parameter_count(&vs), None, vec![])
        });
        let variables = vs.variables();
        let variable = |name: &str| -> Result<(Vec<i64>, Vec<f32>)> {
            let t = variables.get(name).with_context(|| format!("the model has no {name}"))?.detach();
            Ok((t.size(), Vec::<f32>::try_from(t.flatten(0, -1)).with_context(|| format!("reading {name}"))?))
        };
        let ((shape, weight), (_, bias)) = (variable("conv1.weight")?, variable("conv1.bias")?);
        let filters = json!({ "shape": shape, "weight": weight, "bias": bias }); // (6, 1, 5, 5), (6,)
        Ok(App {
            head: net.config.head,
            direct,
            _lent: lent,
            torch: Mutex::new(TorchModel { _vs: vs, net }),
            card: serde_json::to_value(card).context("the card as JSON")?,
            filters,
            classes,
            norm,
            test,
            load_notes,
        })
    }

    /// The answer for one 32x32 image in 0..=1 (`padded`): prediction, probabilities, the
    /// image itself as `seen`, and with `stages` every stage's activations.
    fn analyse(&self, padded: &[f32], stages: bool) -> Result<Map<String, Value>> {
        let xs = handwriting::input_tensor(padded, self.norm); // (1, 1, 32, 32)
        let logits = self.direct.forward(&xs)?; // (1, 10)
        let prediction = crate::inference::predict::from_logits(self.head, &logits)?
            .into_iter()
            .next()
            .context("one prediction for one image")?;
        let mut out = prediction.to_json(&self.classes);
        out.insert("engine".into(), json!("direct"));
        out.insert("seen".into(), json!(padded));
        if stages {
            let activations = {
                let torch = self
                    .torch
                    .lock()
                    .map_err(|_| anyhow::anyhow!("an earlier request failed while computing the stages"))?;
                torch.net.stages(&xs)
            };
            let named: Vec<Value> = activations.iter().map(|(name, t)| stage_json(name, t)).collect::<Result<_>>()?;
            out.insert("stages".into(), Value::Array(named));
        }
        Ok(out)
    }

    /// What loading noticed and what the page goes without, one line each, for the shell to
    /// show: none when all is there.
    pub fn notes(&self) -> Vec<String> {
        let missing = self.test.as_ref().err().map(|why| format!("the page's test-image picker is off: {why}"));
        self.load_notes.iter().cloned().chain(missing).collect()
    }

    fn test_images(&self) -> Result<&TestImages, ApiError> {
        self.test
            .as_ref()
            .map_err(|why| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, format!("no test images: {why}")))
    }
}

impl TestImages {
    fn load(
        classifier: &Model,
        dataset: DatasetKind,
        dir: Option<&std::path::Path>,
        norm: Normalization,
    ) -> Result<TestImages> {
        let raw = data::load_test(dataset, dir, Normalization { mean: 0.0, std: 1.0 })?;
        let pixels = raw.all_inputs(); // (N, 1, 32, 32) in 0..=1
        let predicted = classifier.predicted_classes(&data::normalize(&pixels, norm))?;
        Ok(TestImages {
            pixels: Vec::<f32>::try_from(pixels.flatten(0, -1)).context("reading the test images")?,
            labels: Vec::<i64>::try_from(&raw.labels).context("reading the test labels")?,
            predicted,
        })
    }

    fn image(&self, index: usize) -> &[f32] {
        let pixels = (INPUT_SIZE * INPUT_SIZE) as usize;
        &self.pixels[index * pixels..(index + 1) * pixels]
    }
}

/// The page's files, embedded: path, content type, content. The icon is an SVG under the
/// name browsers ask for unprompted.
const ASSETS: [(&str, &str, &str); 4] = [
    ("/", "text/html; charset=utf-8", include_str!("index.html")),
    ("/app.js", "text/javascript; charset=utf-8", include_str!("app.js")),
    ("/style.css", "text/css; charset=utf-8", include_str!("style.css")),
    ("/favicon.ico", "image/svg+xml", include_str!("favicon.svg")),
];

/// Every route of the page and the API, with the body-size limit and the timeout as layers.
pub fn router(app: Arc<App>) -> Router {
    let mut router = Router::new();
    for (path, content_type, body) in ASSETS {
        router = router.route(path, get(move || async move { ([(header::CONTENT_TYPE, content_type)], body) }));
    }
    router
        .route("/api/model", get(model))
        .route("/api/filters", get(filters))
        .route("/api/predict", axum::routing::post(predict))
        .route("/api/conv", get(conv_classic).post(conv_matrices))
        .route("/api/test-images", get(list_test_images))
        .route("/api/test-images/{index}", get(test_image))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such page or API route (see GET /)") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "this route does not take that method")
        })
        // `limit_body` has read every body, within MAX_BODY_BYTES, before a handler runs; axum's
        // own limit (2 MB unless told) would be a second, smaller one.
        .layer(DefaultBodyLimit::disable())
        .layer(middleware::from_fn(limit_body))
        .layer(TimeoutLayer::with_status_code(StatusCode::REQUEST_TIMEOUT, REQUEST_TIMEOUT))
        .with_state(app)
}

/// The whole body if it is at most [`MAX_BODY_BYTES`]; `None` for one larger, read up to
/// [`MAX_DRAIN_BYTES`] and dropped.
async fn read_within_limit(body: &mut Body) -> Result<Option<Vec<u8>>, axum::Error> {
    let mut kept = Vec::new();
    let mut read = 0;
    while let Some(frame) = std::future::poll_fn(|cx| Pin::new(&mut *body).poll_frame(cx)).await {
        // A frame of trailers carries no data.
        let Ok(data) = frame?.into_data() else {
            continue;
        };
        read += data.len();
        if read > MAX_DRAIN_BYTES {
            return Ok(None);
        }
        if read <= MAX_BODY_BYTES {
            kept.extend_from_slice(&data);
        }
    }
    Ok((read <= MAX_BODY_BYTES).then_some(kept))
}

/// The body-size limit, as a layer: a body over [`MAX_BODY_BYTES`] gets 413 with
/// `Connection: close`, after as much of it as [`MAX_DRAIN_BYTES`] allows was read.
async fn limit_body(request: Request, next: Next) -> Response {
    let (parts, mut body) = request.into_parts();
    let declared: Option<u64> = parts.headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse().ok());
    let expects_continue =
        parts.headers.get(header::EXPECT).is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    // Refused unread: a body declared past the drain bound, or one over the limit whose client
    // waits for "100 Continue" before it sends it (curl does, for large ones) and so sends none.
    let unread =
        declared.is_some_and(|n| n > MAX_DRAIN_BYTES as u64 || (expects_continue && n > MAX_BODY_BYTES as u64));
    let within = if unread { Ok(None) } else { read_within_limit(&mut body).await };
    match within {
        Ok(Some(bytes)) => next.run(Request::from_parts(parts, Body::from(bytes))).await,
        Ok(None) => {
            let message = format!("the body is larger than the limit of {MAX_BODY_BYTES} bytes");
            let mut response = ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, message).into_response();
            response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
            response
        }
        Err(e) => ApiError::new(StatusCode::BAD_REQUEST, format!("reading the body: {e}")).into_response(),
    }
}

/// Runs CPU work (decoding, inference) off the async threads; a panic in it becomes a 500.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| ApiError::internal(anyhow::anyhow!("the request failed: {e}")))?
}

async fn model(State(app): State<Arc<App>>) -> Json<Value> {
    Json(app.card.clone())
}

async fn filters(State(app): State<Arc<App>>) -> Json<Value> {
    Json(app.filters.clone())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StagesQuery {
    /// Add every stage's activations to the answer.
    #[serde(default)]
    stages: bool,
}

/// `{"pixels": [[28 grey values] x 28]}`: 0 black to 255 white, either polarity.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GreyValues {
    pixels: Vec<Vec<f64>>,
}

/// The body of `POST /api/predict`, prepared as `predict` prepares a file: JSON grey values
/// when the content type says JSON, else an image recognised by its content.
fn prepare_body(headers: &HeaderMap, body: &[u8]) -> Result<Prepared> {
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| t.starts_with("application/json"));
    if !json {
        return handwriting::load_bytes(body, "the body");
    }
    let grey: GreyValues = serde_json::from_slice(body).context("the JSON body")?;
    let rows = &grey.pixels;
    ensure!(
        rows.len() == GREY_SIDE,
        "pixels: {} rows; expected {GREY_SIDE} rows of {GREY_SIDE} grey values (0-255)",
        rows.len()
    );
    for (r, row) in rows.iter().enumerate() {
        ensure!(row.len() == GREY_SIDE, "pixels: row {} has {} values; expected {GREY_SIDE}", r + 1, row.len());
        if let Some((c, v)) = row.iter().enumerate().find(|(_, v)| !(0.0..=255.0).contains(*v)) {
            anyhow::bail!("pixels: row {}, column {}: {v} is outside 0-255", r + 1, c + 1);
        }
    }
    // Divided as an 8-bit PNG's values are, so the same values as a PNG give the same answer.
    let gray = Gray::from_fn(GREY_SIDE as u32, GREY_SIDE as u32, |x, y| rows[y as usize][x as usize] as f32 / 255.0);
    handwriting::prepare(&gray, "pixels")
}

/// `POST /api/predict[?stages=true]`: an image (PNG, JPEG, BMP, PGM) or JSON grey values.
async fn predict(
    State(app): State<Arc<App>>,
    query: Result<Query<StagesQuery>, QueryRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(query) = query?;
    let body = body?;
    blocking(move || {
        let prepared = prepare_body(&headers, &body).map_err(ApiError::bad_request)?;
        let mut out = app.analyse(&prepared.padded(), query.stages).map_err(ApiError::internal)?;
        out.insert("inverted".into(), json!(prepared.inverted));
        Ok(Json(Value::Object(out)))
    })
    .await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    /// Only images of this class.
    class: Option<usize>,
    /// Only images the model gets wrong.
    #[serde(default)]
    mistakes: bool,
    limit: Option<usize>,
}

/// `GET /api/test-images[?class=C][&mistakes=true][&limit=N]`: the matching test images.
async fn list_test_images(
    State(app): State<Arc<App>>,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(query) = query?;
    let test = app.test_images()?;
    let bad = |m: String| ApiError::new(StatusCode::BAD_REQUEST, m);
    if let Some(c) = query.class {
        if c >= app.classes.len() {
            return Err(bad(format!("class {c}: the classes are 0 to {}", app.classes.len() - 1)));
        }
    }
    let limit = query.limit.unwrap_or(DEFAULT_LIST_LIMIT);
    if limit > test.labels.len() {
        return Err(bad(format!("limit {limit}: at most {} (the size of the test set)", test.labels.len())));
    }
    let matching: Vec<usize> = (0..test.labels.len())
        .filter(|&i| query.class.is_none_or(|c| test.labels[i] == c as i64))
        .filter(|&i| !query.mistakes || test.labels[i] != test.predicted[i])
        .collect();
    let images: Vec<Value> = matching
        .iter()
        .take(limit)
        .map(|&i| json!({ "index": i, "class": test.labels[i], "predicted": test.predicted[i] }))
        .collect();
    Ok(Json(json!({ "total": test.labels.len(), "matching": matching.len(), "images": images })))
}

/// `GET /api/test-images/{index}[?stages=true]`: one test image through the network.
async fn test_image(
    State(app): State<Arc<App>>,
    index: Result<UrlPath<usize>, PathRejection>,
    query: Result<Query<StagesQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let UrlPath(index) = index?;
    let Query(query) = query?;
    blocking(move || {
        let test = app.test_images()?;
        if index >= test.labels.len() {
            let message = format!("test image {index}: the test set has images 0 to {}", test.labels.len() - 1);
            return Err(ApiError::new(StatusCode::NOT_FOUND, message));
        }
        let mut out = app.analyse(test.image(index), query.stages).map_err(ApiError::internal)?;
        out.insert("index".into(), json!(index));
        out.insert("class".into(), json!(test.labels[index]));
        Ok(Json(Value::Object(out)))
    })
    .await
}

/// `POST /api/conv`: a convolution to walk through. The filter is a matrix or a preset name.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConvRequest {
    input: Matrix,
    filter: Option<Matrix>,
    preset: Option<String>,
    #[serde(default = "one")]
    stride: usize,
    #[serde(default)]
    padding: usize,
}

fn one() -> usize {
    1
}

/// A matrix from JSON: rows of equal length, not empty, at most [`MAX_CONV_SIDE`] a side.
fn check_matrix(m: &Matrix, name: &str) -> Result<()> {
    ensure!(!m.is_empty() && !m[0].is_empty(), "{name}: empty; expected rows of numbers like [[1, 0], [0, 1]]");
    ensure!(
        m.len() <= MAX_CONV_SIDE && m[0].len() <= MAX_CONV_SIDE,
        "{name}: {}x{}; at most {MAX_CONV_SIDE}x{MAX_CONV_SIDE}",
        m.len(),
        m[0].len()
    );
    if let Some(r) = m.iter().position(|row| row.len() != m[0].len()) {
        anyhow::bail!("{name}: row {} has {} values, but row 1 has {}", r + 1, m[r].len(), m[0].len());
    }
    Ok(())
}

/// Every window of the convolution, the output, and how far libtorch's conv2d is from the
/// plain loop (0 when they agree).
fn walkthrough(input: &Matrix, filter: &Matrix, stride: usize, padding: usize) -> Result<Value> {
    conv::check_shapes(input, filter, stride, padding)?;
    let windows = conv::windows(input, filter, stride, padding);
    let output = conv::sums(&windows, conv::output_size(input[0].len(), filter[0].len(), stride, padding));
    let torch = conv::torch_conv2d(input, filter, stride, padding)?;
    let difference =
        output.iter().flatten().zip(torch.iter().flatten()).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
    Ok(json!({
        "input": input, "filter": filter, "stride": stride, "padding": padding,
        "windows": windows, "output": output, "libtorch_max_difference": difference,
    }))
}

/// `GET /api/conv`: the classic 5x5 example with its 3x3 filter (output 4 3 4 / 2 4 3 / 2 3 4).
async fn conv_classic() -> Result<Json<Value>, ApiError> {
    let (input, filter) = (conv::parse_compact(conv::CLASSIC_INPUT), conv::parse_compact(conv::CLASSIC_FILTER));
    blocking(move || walkthrough(&input, &filter, 1, 0).map(Json).map_err(ApiError::internal)).await
}

async fn conv_matrices(body: Result<Bytes, BytesRejection>) -> Result<Json<Value>, ApiError> {
    let body = body?;
    blocking(move || {
        let request = || -> Result<Value> {
            let r: ConvRequest = serde_json::from_slice(&body).context("the JSON body")?;
            let filter = match (r.filter, r.preset) {
                (Some(f), None) => f,
                (None, Some(name)) => {
                    let preset = name.parse::<Preset>().map_err(|_| {
                        let names = Preset::NAMES;
                        anyhow::anyhow!("preset {name:?}: not one of {}", names.join(", "))
                    })?;
                    preset.filter()
                }
                _ => anyhow::bail!("give either a filter matrix or a preset name"),
            };
            check_matrix(&r.input, "input")?;
            check_matrix(&filter, "filter")?;
            walkthrough(&r.input, &filter, r.stride, r.padding)
        };
        request().map(Json).map_err(ApiError::bad_request)
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grey_values_are_checked_for_shape_and_range() {
        let json = HeaderMap::from_iter([(header::CONTENT_TYPE, "application/json".parse().unwrap())]);
        let body =
            |rows: usize, cols: usize, v: f64| json!({ "pixels": vec![vec![v; cols]; rows] }).to_string().into_bytes();
        let err = |b: Vec<u8>| format!("{:#}", prepare_body(&json, &b).unwrap_err());
        assert_eq!(err(body(27, 28, 0.0)), "pixels: 27 rows; expected 28 rows of 28 grey values (0-255)");
        assert_eq!(err(body(28, 29, 0.0)), "pixels: row 1 has 29 values; expected 28");
        assert_eq!(err(body(28, 28, 256.0)), "pixels: row 1, column 1: 256 is outside 0-255");
        assert!(err(b"{\"pixels\": 3}".to_vec()).starts_with("the JSON body: invalid type"));
        assert!(err(body(28, 28, 0.0)).contains("the image is blank"));
    }

    #[test]
    fn errors_are_one_line() {
        let e = ApiError::new(StatusCode::BAD_REQUEST, "first\nsecond  third");
        assert_eq!(e.message, "first second third");
    }
}
