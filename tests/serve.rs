//! `lenet5 serve` over real HTTP: the binary started with `--port 0` on loopback, its answers
//! compared with `lenet5 predict` on the same images, its stages with a plain loop over the
//! served filters, and each kind of bad input answered with its status and a one-line reason.
//! Every server is killed when its test ends, whatever happens. Needs MNIST in data/mnist.

mod support;

use image::{GrayImage, ImageFormat, Luma};
use serde_json::{json, Value};
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};
use support::*;

/// How long a server may take to load the model and the test set and print its address.
const START_TIMEOUT: Duration = Duration::from_secs(120);

/// A running `lenet5 serve`; dropping it kills the process.
struct Server {
    child: Child,
    base: String,
    agent: ureq::Agent,
    /// The lines the server prints on stdout, read on a thread so a silent server times out.
    stdout: Receiver<String>,
}

impl Server {
    fn start(model: &Path) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_lenet5"))
            .args(["serve", "--port", "0", "--model", s(model)])
            .env("OMP_NUM_THREADS", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the binary runs");
        let out = child.stdout.take().expect("piped");
        let (tx, stdout) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
        let mut server = Server { child, base: String::new(), agent, stdout };
        let line = server.stdout.recv_timeout(START_TIMEOUT).unwrap_or_default();
        let Some(address) = line.split("http://").nth(1).and_then(|rest| rest.strip_suffix("/ (Ctrl-C stops)")) else {
            let _ = server.child.kill();
            panic!("no address from lenet5 serve: {line:?}\n{}", server.stderr());
        };
        assert!(address.starts_with("127.0.0.1:"), "the server listens on {address}, not on loopback only");
        server.base = format!("http://{address}");
        server
    }

    /// What the server wrote on stderr, once it has exited.
    fn stderr(&mut self) -> String {
        let _ = self.child.wait();
        let mut text = String::new();
        if let Some(mut err) = self.child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut err, &mut text);
        }
        text
    }

    /// Status and JSON body of a request; `content_type` and `body` make it a POST.
    fn request(&self, path: &str, post: Option<(&str, &[u8])>) -> (u16, Value) {
        let url = format!("{}{path}", self.base);
        let response = match post {
            Some((content_type, body)) => self.agent.post(&url).header("Content-Type", content_type).send(body),
            None => self.agent.get(&url).call(),
        };
        let mut response = response.unwrap_or_else(|e| panic!("{path}: {e}"));
        let status = response.status().as_u16();
        let text = response.body_mut().with_config().limit(64 << 20).read_to_string().unwrap();
        (status, serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: not JSON ({e}): {text}")))
    }

    fn get(&self, path: &str) -> Value {
        let (status, body) = self.request(path, None);
        assert_eq!(status, 200, "GET {path}: {body}");
        body
    }

    fn post(&self, path: &str, content_type: &str, body: &[u8]) -> Value {
        let (status, answer) = self.request(path, Some((content_type, body)));
        assert_eq!(status, 200, "POST {path}: {answer}");
        answer
    }

    /// Ctrl-C (SIGINT), then the exit status, the rest of stdout and stderr.
    fn stop(mut self) -> (ExitStatus, String, String) {
        let pid = self.child.id().to_string();
        let sent = Command::new("kill").args(["-INT", &pid]).status().expect("kill runs");
        assert!(sent.success());
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                let stdout: Vec<String> =
                    std::iter::from_fn(|| self.stdout.recv_timeout(Duration::from_secs(5)).ok()).collect();
                return (status, stdout.join("\n"), self.stderr());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("lenet5 serve did not stop within 20 s of Ctrl-C");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn png(img: &GrayImage) -> Vec<u8> {
    let mut bytes = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut bytes), ImageFormat::Png).unwrap();
    bytes
}

fn probabilities(v: &Value) -> Vec<f64> {
    v["probabilities"].as_array().unwrap().iter().map(|p| p.as_f64().unwrap()).collect()
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
}

#[test]
fn predictions_equal_lenet5_predict_on_the_same_images() {
    let model = model();
    let (images, _) = mnist_test();
    let dir = temp_dir("serve-predict");
    // 16 test digits as plain 28x28 PNGs and as 4x larger scans (dark ink on light paper).
    let mut files: Vec<PathBuf> = vec![];
    for (i, pixels) in images.iter().take(16).enumerate() {
        let plain = GrayImage::from_raw(28, 28, pixels.clone()).unwrap();
        let paper = GrayImage::from_fn(28, 28, |x, y| Luma([255 - plain.get_pixel(x, y).0[0]]));
        let scan = image::imageops::resize(&paper, 112, 112, image::imageops::FilterType::Triangle);
        for (name, img) in [("plain", plain), ("scan", scan)] {
            let path = dir.join(format!("{name}-{i:02}.png"));
            img.save_with_format(&path, ImageFormat::Png).unwrap();
            files.push(path);
        }
    }
    // And the README's example: the sample scans in docs/digits, as PGM.
    files.extend((0..10).map(|d| PathBuf::from(format!("docs/digits/digit-{d}.pgm"))));
    let predict = |engine: &str| -> Vec<Value> {
        let mut args = vec!["predict", "--json", "--threads", "1", "--engine", engine, "--model", s(&model)];
        args.extend(files.iter().map(|f| s(f)));
        let json: Value = serde_json::from_str(&ok(&args)).unwrap();
        json["predictions"].as_array().unwrap().clone()
    };
    let (direct, libtorch) = (predict("direct"), predict("libtorch"));

    let server = Server::start(&model);
    for ((file, cli), reference) in files.iter().zip(&direct).zip(&libtorch) {
        let answer = server.post("/api/predict", "image/png", &std::fs::read(file).unwrap());
        let name = file.display();
        assert_eq!(answer["engine"], "direct");
        for field in ["prediction", "label", "top3", "inverted"] {
            assert_eq!(answer[field], cli[field], "{name}: {field}");
        }
        // The same engine on the same preprocessed pixels: the same numbers, bit for bit.
        assert_eq!(probabilities(&answer), probabilities(cli), "{name}");
        // libtorch sums in another order: the same digit, probabilities within 1e-5.
        assert_eq!(answer["prediction"], reference["prediction"], "{name}: libtorch predicts otherwise");
        for (a, b) in probabilities(&answer).iter().zip(probabilities(reference)) {
            assert!((a - b).abs() < 1e-5, "{name}: {a} vs libtorch's {b}");
        }
    }
    // The plain digits as JSON grey values: the same answers as their PNG files.
    for (i, pixels) in images.iter().take(16).enumerate() {
        let rows: Vec<&[u8]> = pixels.chunks(28).collect();
        let answer = server.post("/api/predict", "application/json", json!({ "pixels": rows }).to_string().as_bytes());
        assert_eq!(probabilities(&answer), probabilities(&direct[2 * i]), "grey values of test image {i}");
    }
    let (status, stdout, stderr) = server.stop();
    assert!(status.success(), "Ctrl-C ends the server cleanly: {status:?}\n{stderr}");
    assert_eq!(stdout, "stopped");
}

#[test]
fn the_stages_are_what_a_plain_loop_computes_from_the_served_filters() {
    let model = model();
    let (images, labels) = mnist_test();
    let server = Server::start(&model);
    let card: Value = serde_json::from_str(&std::fs::read_to_string(model.with_extension("json")).unwrap()).unwrap();
    assert_eq!(server.get("/api/model"), card, "GET /api/model is the card beside the weights");

    let paper = GrayImage::from_fn(28, 28, |x, y| Luma([255 - images[0][(y * 28 + x) as usize]]));
    let answer = server.post("/api/predict?stages=true", "image/png", &png(&paper));
    assert_eq!(answer["inverted"], true);
    let stages = answer["stages"].as_array().unwrap();
    let shapes: Vec<(String, Value)> =
        stages.iter().map(|s| (s["name"].as_str().unwrap().to_string(), s["shape"].clone())).collect();
    let expected: Vec<(String, Value)> = [
        ("input", json!([1, 32, 32])),
        ("C1", json!([6, 28, 28])),
        ("S2", json!([6, 14, 14])),
        ("C3", json!([16, 10, 10])),
        ("S4", json!([16, 5, 5])),
        ("F5", json!([120])),
        ("F6", json!([84])),
        ("output", json!([10])),
    ]
    .into_iter()
    .map(|(n, s)| (n.to_string(), s))
    .collect();
    assert_eq!(shapes, expected);
    let stage = |name: &str| floats(&stages.iter().find(|s| s["name"] == name).unwrap()["values"]);
    let (input, c1, s2, logits) = (stage("input"), stage("C1"), stage("S2"), stage("output"));

    // The input is `seen` normalised with the card's mean and std.
    let norm = &card["input"]["normalization"];
    let (mean, std) = (norm["mean"].as_f64().unwrap(), norm["std"].as_f64().unwrap());
    for (x, seen) in input.iter().zip(floats(&answer["seen"])) {
        assert!((x - (seen - mean) / std).abs() < 1e-5, "input {x} vs seen {seen}");
    }
    // C1 = ReLU(conv1 over the input + bias), by the definition, in f64. The server sums 25
    // products in f32: 1e-4 is far above its rounding and far below any wrong weight or index.
    let filters = server.get("/api/filters");
    assert_eq!(filters["shape"], json!([6, 1, 5, 5]));
    let (w, b) = (floats(&filters["weight"]), floats(&filters["bias"]));
    for m in 0..6 {
        for y in 0..28 {
            for x in 0..28 {
                let sum: f64 = (0..25).map(|k| w[m * 25 + k] * input[(y + k / 5) * 32 + x + k % 5]).sum::<f64>() + b[m];
                let got = c1[(m * 28 + y) * 28 + x];
                assert!((got - sum.max(0.0)).abs() < 1e-4, "C1 map {m} at ({y},{x}): {got} vs {sum}");
            }
        }
    }
    // S2 = the largest of each 2x2 window of C1 (the model is Modern: max-pooling), exactly.
    for m in 0..6 {
        for y in 0..14 {
            for x in 0..14 {
                let at = |dy: usize, dx: usize| c1[(m * 28 + 2 * y + dy) * 28 + 2 * x + dx];
                assert_eq!(s2[(m * 14 + y) * 14 + x], at(0, 0).max(at(0, 1)).max(at(1, 0)).max(at(1, 1)));
            }
        }
    }
    // The probabilities (direct engine) are the softmax of the output stage (libtorch's logits).
    let total: f64 = logits.iter().map(|l| l.exp()).sum();
    for (p, l) in probabilities(&answer).iter().zip(&logits) {
        assert!((p - l.exp() / total).abs() < 1e-5, "{p} vs softmax {}", l.exp() / total);
    }

    // The test images: the mistakes listed are those the card counts, and each is one.
    let metrics = &card["metrics"];
    let wrong = metrics["test_total"].as_i64().unwrap() - metrics["test_correct"].as_i64().unwrap();
    let mistakes = server.get("/api/test-images?mistakes=true&limit=10000");
    assert_eq!(mistakes["matching"], wrong);
    for m in mistakes["images"].as_array().unwrap() {
        let i = m["index"].as_u64().unwrap() as usize;
        assert_eq!(m["class"], labels[i] as i64);
        assert_ne!(m["class"], m["predicted"]);
    }
    let threes = server.get("/api/test-images?class=3&limit=5");
    let first_threes: Vec<usize> = (0..labels.len()).filter(|&i| labels[i] == 3).take(5).collect();
    assert_eq!(
        threes["images"].as_array().unwrap().iter().map(|t| t["index"].as_u64().unwrap() as usize).collect::<Vec<_>>(),
        first_threes
    );
    let eighteen = server.get("/api/test-images/18?stages=true");
    assert_eq!((eighteen["index"].clone(), eighteen["class"].clone()), (json!(18), json!(labels[18])));
    let seen = floats(&eighteen["seen"]);
    assert_eq!(
        seen[2 * 32 + 2..2 * 32 + 30],
        images[18][..28].iter().map(|&v| (v as f32 / 255.0) as f64).collect::<Vec<_>>()[..]
    );
}

#[test]
fn the_convolution_walkthrough_is_the_classic_example_and_any_matrices() {
    let server = Server::start(&model());
    let classic = server.get("/api/conv");
    assert_eq!(classic["output"], json!([[4.0, 3.0, 4.0], [2.0, 4.0, 3.0], [2.0, 3.0, 4.0]]));
    let windows = classic["windows"].as_array().unwrap();
    assert_eq!(windows.len(), 9);
    // Window (0,2): rows 0-2, columns 2-4 under 101/010/101, the one often printed as 3.
    assert_eq!(
        (windows[2]["row"].clone(), windows[2]["col"].clone(), windows[2]["sum"].clone()),
        (json!(0), json!(2), json!(4.0))
    );
    let products: f64 =
        windows[2]["terms"].as_array().unwrap().iter().map(|t| t[0].as_f64().unwrap() * t[1].as_f64().unwrap()).sum();
    assert_eq!(products, 4.0);

    // The edge preset over a 7x6 matrix with stride 2 and padding 1, against the definition.
    let input: Vec<Vec<f64>> = (0..7).map(|i| (0..6).map(|j| ((i * 7 + j * 3) % 10) as f64).collect()).collect();
    let edge = [[-1.0, -1.0, -1.0], [-1.0, 8.0, -1.0], [-1.0, -1.0, -1.0]];
    let walk = server.post(
        "/api/conv",
        "application/json",
        json!({ "input": input, "preset": "edge", "stride": 2, "padding": 1 }).to_string().as_bytes(),
    );
    let at =
        |y: i64, x: i64| if (0..7).contains(&y) && (0..6).contains(&x) { input[y as usize][x as usize] } else { 0.0 };
    let expected: Vec<Vec<f64>> = (0..4)
        .map(|i| {
            (0..3)
                .map(|j| {
                    (0..9).map(|k| edge[k / 3][k % 3] * at(2 * i - 1 + k as i64 / 3, 2 * j - 1 + k as i64 % 3)).sum()
                })
                .collect()
        })
        .collect();
    assert_eq!(walk["output"], json!(expected));
    assert_eq!(walk["libtorch_max_difference"], json!(0.0));
    assert_eq!(server.stop().0.code(), Some(0));
}

/// A bad request: path, (content type, body) to POST or none to GET, the status and the
/// words the reason must hold.
type Case<'a> = (&'a str, Option<(&'a str, Vec<u8>)>, u16, &'a str);

#[test]
fn bad_input_gets_its_status_and_a_one_line_reason_and_the_server_carries_on() {
    let server = Server::start(&model());
    let blank = png(&GrayImage::from_pixel(40, 30, Luma([250])));
    let mut truncated = png(&GrayImage::from_fn(64, 64, |x, y| Luma([((x * y) % 256) as u8])));
    truncated.truncate(truncated.len() / 2);
    let too_big = vec![0u8; 8 * 1024 * 1024 + 1];
    let grey =
        |rows: usize, cols: usize, v: f64| json!({ "pixels": vec![vec![v; cols]; rows] }).to_string().into_bytes();
    let conv = |v: Value| v.to_string().into_bytes();
    let cases: Vec<Case> = vec![
        (
            "/api/predict",
            Some(("application/octet-stream", too_big)),
            413,
            "the body is larger than the limit of 8388608 bytes",
        ),
        (
            "/api/predict",
            Some(("text/plain", b"this is not an image\n".to_vec())),
            400,
            "the body: not an image this program reads (PNG, JPEG, BMP or PGM/PPM/PBM)",
        ),
        ("/api/predict", Some(("image/png", vec![])), 400, "the body: empty (no image)"),
        ("/api/predict", Some(("image/png", blank)), 400, "the body: the image is blank"),
        ("/api/predict", Some(("image/png", truncated)), 400, "the body: cannot decode the Png image"),
        (
            "/api/predict",
            Some(("application/json", b"{\"pixels\": ".to_vec())),
            400,
            "the JSON body: EOF while parsing",
        ),
        (
            "/api/predict",
            Some(("application/json", grey(27, 28, 0.0))),
            400,
            "pixels: 27 rows; expected 28 rows of 28 grey values (0-255)",
        ),
        ("/api/predict", Some(("application/json", grey(28, 3, 0.0))), 400, "pixels: row 1 has 3 values; expected 28"),
        (
            "/api/predict",
            Some(("application/json", grey(28, 28, -1.0))),
            400,
            "pixels: row 1, column 1: -1 is outside 0-255",
        ),
        ("/api/predict?stages=maybe", Some(("image/png", vec![1])), 400, "Failed to deserialize query string"),
        ("/api/predict", None, 405, "this route does not take that method"),
        (
            "/api/conv",
            Some(("application/json", conv(json!({ "input": [[1, 2], [3]], "preset": "edge" })))),
            400,
            "input: row 2 has 1 values, but row 1 has 2",
        ),
        (
            "/api/conv",
            Some(("application/json", conv(json!({ "input": [[1]], "preset": "emboss" })))),
            400,
            "preset \"emboss\": not one of edge, sobel-x, sobel-y, sharpen, blur",
        ),
        (
            "/api/conv",
            Some(("application/json", conv(json!({ "input": [[1, 2], [3, 4]], "preset": "blur" })))),
            400,
            "the 3x3 filter is larger than the 2x2 input",
        ),
        (
            "/api/conv",
            Some(("application/json", conv(json!({ "input": vec![vec![0; 65]; 3], "filter": [[1]] })))),
            400,
            "input: 3x65; at most 64x64",
        ),
        ("/api/test-images/10000", None, 404, "test image 10000: the test set has images 0 to 9999"),
        ("/api/test-images/first", None, 400, "Cannot parse `first`"),
        ("/api/test-images?class=10", None, 400, "class 10: the classes are 0 to 9"),
        ("/nowhere", None, 404, "no such page or API route"),
    ];
    for (path, post, status, message) in &cases {
        let (got, body) = server.request(path, post.as_ref().map(|(t, b)| (*t, b.as_slice())));
        let error = body["error"].as_str().unwrap_or_else(|| panic!("{path}: no error in {body}"));
        assert_eq!(got, *status, "{path}: {error}");
        assert!(error.contains(message), "{path}: {error:?} does not say {message:?}");
        assert!(!error.contains('\n'), "{path}: more than one line: {error:?}");
    }
    // None of that stopped it; Ctrl-C does, cleanly.
    assert_eq!(server.get("/api/model")["format"], "lenet5-model");
    let (status, stdout, stderr) = server.stop();
    assert_eq!((status.code(), stdout.as_str()), (Some(0), "stopped"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// The status and the `error` of an answer, or what failed.
type Answer = Result<(u16, String), String>;

/// One POST of `len` zero bytes to `/api/predict` over a raw socket, written in 64 KiB chunks
/// (with a Content-Length, or `chunked`) before the answer is read, as most clients do.
fn oversize_post(address: &str, len: usize, chunked: bool) -> Answer {
    use std::io::{Read, Write};
    const CHUNK: usize = 64 << 10;
    let mut stream = std::net::TcpStream::connect(address).map_err(|e| format!("connecting: {e}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    stream.set_write_timeout(Some(Duration::from_secs(60))).unwrap();
    let framing = if chunked { "Transfer-Encoding: chunked".to_string() } else { format!("Content-Length: {len}") };
    let head = format!(
        "POST /api/predict HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/octet-stream\r\n{framing}\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).map_err(|e| format!("writing the head: {e}"))?;
    let chunk = [0u8; CHUNK];
    let mut sent = 0;
    while sent < len {
        let n = CHUNK.min(len - sent);
        let written = if chunked {
            stream
                .write_all(format!("{n:x}\r\n").as_bytes())
                .and_then(|()| stream.write_all(&chunk[..n]))
                .and_then(|()| stream.write_all(b"\r\n"))
        } else {
            stream.write_all(&chunk[..n])
        };
        written.map_err(|e| format!("writing the body after {sent} of {len} bytes: {e}"))?;
        sent += n;
    }
    if chunked {
        stream.write_all(b"0\r\n\r\n").map_err(|e| format!("ending the chunked body: {e}"))?;
    }
    // The answer: its head, then as many bytes as its Content-Length says.
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    let split = loop {
        if let Some(at) = answer.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        let n = stream.read(&mut buf).map_err(|e| format!("reading the answer: {e}"))?;
        if n == 0 {
            return Err(format!("the connection closed after {} bytes of answer", answer.len()));
        }
        answer.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&answer[..split]).to_lowercase();
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).ok_or_else(|| format!("no status in {head:?}"))?;
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| format!("no content-length in {head:?}"))?;
    let mut body = answer[split..].to_vec();
    while body.len() < length {
        let n = stream.read(&mut buf).map_err(|e| format!("reading the answer's body: {e}"))?;
        if n == 0 {
            return Err(format!("the connection closed after {} of {length} bytes of the answer's body", body.len()));
        }
        body.extend_from_slice(&buf[..n]);
    }
    let json: Value = serde_json::from_slice(&body).map_err(|e| format!("the answer's body is not JSON ({e})"))?;
    Ok((status, json["error"].as_str().unwrap_or_default().to_string()))
}

#[test]
fn every_oversize_body_gets_its_413_though_the_client_is_still_sending_it() {
    // 200 POSTs, 8 at a time, each twice the limit: the server decides while the client still
    // has 8 MiB to send. Half declare their length, half are chunked.
    const POSTS: usize = 200;
    const CLIENTS: usize = 8;
    let len = 2 * lenet5::serve::MAX_BODY_BYTES;
    let server = Server::start(&model());
    let address = server.base.strip_prefix("http://").unwrap();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let answers: Vec<(usize, Answer)> = std::thread::scope(|scope| {
        let clients: Vec<_> = (0..CLIENTS)
            .map(|_| {
                scope.spawn(|| {
                    let mut answers = vec![];
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        if i >= POSTS {
                            return answers;
                        }
                        answers.push((i, oversize_post(address, len, i % 2 == 1)));
                    }
                })
            })
            .collect();
        clients.into_iter().flat_map(|c| c.join().unwrap()).collect()
    });
    let reason = format!("the body is larger than the limit of {} bytes", lenet5::serve::MAX_BODY_BYTES);
    let wrong: Vec<String> = answers
        .iter()
        .filter(|(_, answer)| !matches!(answer, Ok((413, r)) if *r == reason))
        .map(|(i, answer)| format!("POST {i} ({}): {answer:?}", if i % 2 == 1 { "chunked" } else { "Content-Length" }))
        .collect();
    assert_eq!(answers.len(), POSTS);
    assert!(
        wrong.is_empty(),
        "{} of {POSTS} oversize POSTs got no 413 with its reason:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
    // And the server still answers.
    assert_eq!(server.get("/api/model")["format"], "lenet5-model");
}

#[test]
fn a_client_waiting_for_100_continue_gets_the_413_before_it_sends_the_body() {
    use std::io::{Read, Write};
    let server = Server::start(&model());
    let address = server.base.strip_prefix("http://").unwrap();
    let mut stream = std::net::TcpStream::connect(address).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let len = 2 * lenet5::serve::MAX_BODY_BYTES;
    let head = format!(
        "POST /api/predict HTTP/1.1\r\nHost: {address}\r\nContent-Length: {len}\r\nExpect: 100-continue\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).unwrap();
    // No "100 Continue": the 413 itself, then the server closes the connection.
    let mut answer = String::new();
    stream.read_to_string(&mut answer).expect("the server answers and closes");
    assert!(answer.starts_with("HTTP/1.1 413 "), "{answer}");
    assert!(answer.to_lowercase().contains("\r\nconnection: close\r\n"), "{answer}");
    let reason = format!("the body is larger than the limit of {} bytes", lenet5::serve::MAX_BODY_BYTES);
    assert!(answer.ends_with(&json!({ "error": reason }).to_string()), "{answer}");
}
