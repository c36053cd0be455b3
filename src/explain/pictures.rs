//! PNG pictures of numbers: grids of grayscale maps (digits, filters, feature maps) enlarged
//! nearest-neighbour so every value stays one crisp square, and plotters charts (bars, curves,
//! heat map). Text uses DejaVu Sans built into the binary, so no system font is needed.

use ab_glyph::{point, Font, FontRef, Glyph, PxScale, ScaleFont};
use anyhow::{anyhow, ensure, Context, Result};
use image::{ImageEncoder, RgbImage};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters_backend::{BackendColor, BackendCoord, BackendTextStyle, DrawingErrorKind};
use std::path::Path;

/// The font family every picture uses; [`fonts`] registers DejaVu Sans under this name.
const FONT: &str = "sans-serif";
const TITLE_SIZE: f64 = 20.0;
const CAPTION_SIZE: f64 = 13.0;
/// Space around and between the tiles of a grid, and the bands for the title and captions.
const MARGIN: u32 = 12;
const GAP: u32 = 12;
const TITLE_BAND: u32 = 36;
const CAPTION_BAND: u32 = 20;
/// The frame drawn around each tile.
const FRAME: image::Rgb<u8> = image::Rgb([160, 160, 160]);

/// DejaVu Sans, regular and bold, compiled in from the `dejavu` crate.
struct Fonts {
    regular: FontRef<'static>,
    bold: FontRef<'static>,
}

fn fonts() -> &'static Fonts {
    static FONTS: std::sync::OnceLock<Fonts> = std::sync::OnceLock::new();
    FONTS.get_or_init(|| {
        // The bytes are DejaVu Sans as shipped in the `dejavu` crate: valid TrueType, so parsing
        // cannot fail (the unit tests render text with both faces).
        let parse = |bytes: &'static [u8]| FontRef::try_from_slice(bytes).expect("the embedded DejaVu Sans parses");
        let fonts = Fonts { regular: parse(dejavu::sans::regular()), bold: parse(dejavu::sans::bold()) };
        // plotters only measures text with its registered font; drawing goes through `Canvas`.
        let regular = plotters::style::register_font(FONT, FontStyle::Normal, dejavu::sans::regular());
        let bold = plotters::style::register_font(FONT, FontStyle::Bold, dejavu::sans::bold());
        assert!(regular.is_ok() && bold.is_ok(), "the embedded DejaVu Sans registers with plotters");
        fonts
    })
}

fn font(size: f64) -> FontDesc<'static> {
    fonts();
    (FONT, size).into_font()
}

/// A line of text laid out: glyphs on a baseline at `ascent`, and the box they fill.
struct Line {
    glyphs: Vec<Glyph>,
    width: f32,
    height: f32,
    bold: bool,
}

fn layout(text: &str, size: f64, bold: bool) -> Line {
    let f = fonts();
    let face = if bold { &f.bold } else { &f.regular };
    let scaled = face.as_scaled(PxScale::from(size as f32));
    let (mut caret, mut prev, mut glyphs) = (0.0f32, None, Vec::new());
    for c in text.chars() {
        let id = scaled.glyph_id(c);
        if let Some(p) = prev {
            caret += scaled.kern(p, id);
        }
        glyphs.push(id.with_scale_and_position(size as f32, point(caret, scaled.ascent())));
        caret += scaled.h_advance(id);
        prev = Some(id);
    }
    Line { glyphs, width: caret, height: scaled.ascent() - scaled.descent(), bold }
}

impl Line {
    /// Calls `put(x, y, coverage)` for every inked pixel, relative to the line's top-left corner.
    fn render(&self, mut put: impl FnMut(i32, i32, f32)) {
        let f = fonts();
        let face = if self.bold { &f.bold } else { &f.regular };
        for g in &self.glyphs {
            if let Some(outline) = face.outline_glyph(g.clone()) {
                let b = outline.px_bounds();
                outline.draw(|x, y, c| put(b.min.x as i32 + x as i32, b.min.y as i32 + y as i32, c));
            }
        }
    }
}

/// Width of `text` in pixels.
fn text_width(text: &str, size: f64, bold: bool) -> u32 {
    layout(text, size, bold).width.ceil() as u32
}

/// plotters' bitmap backend with text drawn by ab_glyph directly: plotters' own ab_glyph path
/// truncates each glyph's vertical offset toward zero, so dots and digits jump by a pixel.
struct Canvas<'a> {
    inner: BitMapBackend<'a>,
}

impl<'a> Canvas<'a> {
    fn new(rgb: &'a mut [u8], size: (u32, u32)) -> Canvas<'a> {
        Canvas { inner: BitMapBackend::with_buffer(rgb, size) }
    }
}

type CanvasError = DrawingErrorKind<<BitMapBackend<'static> as DrawingBackend>::ErrorType>;

impl DrawingBackend for Canvas<'_> {
    type ErrorType = <BitMapBackend<'static> as DrawingBackend>::ErrorType;

    fn get_size(&self) -> (u32, u32) {
        self.inner.get_size()
    }
    fn ensure_prepared(&mut self) -> Result<(), CanvasError> {
        self.inner.ensure_prepared()
    }
    fn present(&mut self) -> Result<(), CanvasError> {
        self.inner.present()
    }
    fn draw_pixel(&mut self, point: BackendCoord, color: BackendColor) -> Result<(), CanvasError> {
        self.inner.draw_pixel(point, color)
    }
    fn draw_line<S: plotters_backend::BackendStyle>(
        &mut self,
        from: BackendCoord,
        to: BackendCoord,
        style: &S,
    ) -> Result<(), CanvasError> {
        self.inner.draw_line(from, to, style)
    }
    fn draw_rect<S: plotters_backend::BackendStyle>(
        &mut self,
        upper_left: BackendCoord,
        bottom_right: BackendCoord,
        style: &S,
        fill: bool,
    ) -> Result<(), CanvasError> {
        self.inner.draw_rect(upper_left, bottom_right, style, fill)
    }
    fn blit_bitmap(&mut self, pos: BackendCoord, size: (u32, u32), src: &[u8]) -> Result<(), CanvasError> {
        self.inner.blit_bitmap(pos, size, src)
    }
    fn estimate_text_size<S: BackendTextStyle>(&self, text: &str, style: &S) -> Result<(u32, u32), CanvasError> {
        let line = layout(text, style.size(), matches!(style.style(), FontStyle::Bold));
        Ok((line.width.ceil() as u32, line.height.ceil() as u32))
    }
    fn draw_text<S: BackendTextStyle>(&mut self, text: &str, style: &S, pos: BackendCoord) -> Result<(), CanvasError> {
        let colour = style.color();
        let line = layout(text, style.size(), matches!(style.style(), FontStyle::Bold));
        let (w, h) = (line.width.round() as i32, line.height.round() as i32);
        let dx = match style.anchor().h_pos {
            HPos::Left => 0,
            HPos::Center => -w / 2,
            HPos::Right => -w,
        };
        let dy = match style.anchor().v_pos {
            VPos::Top => 0,
            VPos::Center => -h / 2,
            VPos::Bottom => -h,
        };
        let transform = style.transform();
        let mut result = Ok(());
        line.render(|x, y, coverage| {
            let (x, y) = transform.transform(x + dx, y + dy);
            let c = BackendColor { alpha: colour.alpha * coverage.min(1.0) as f64, rgb: colour.rgb };
            if result.is_ok() {
                result = self.inner.draw_pixel((pos.0 + x, pos.1 + y), c);
            }
        });
        result
    }
}

/// Draws `text` with its top edge centred on `(x, y)`.
fn centred_text(
    area: &DrawingArea<Canvas, Shift>,
    text: &str,
    size: f64,
    (x, y): (i32, i32),
    bold: bool,
) -> Result<()> {
    let mut desc = font(size);
    if bold {
        desc = desc.style(FontStyle::Bold);
    }
    let style = TextStyle::from(desc).color(&BLACK).pos(Pos::new(HPos::Center, VPos::Top));
    area.draw_text(text, &style, (x, y)).map_err(|e| anyhow!("drawing the text {text:?}: {e}"))
}

/// How the values of a tile become gray levels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shading {
    /// The tile's own minimum is black and its maximum white (a constant tile is black).
    Stretch,
    /// Zero is mid-gray and +-(largest |value|) white and black: for weights, whose sign matters.
    Signed,
}

impl Shading {
    /// The values drawn black and white for a tile holding `values`.
    pub fn range(self, values: &[f32]) -> (f32, f32) {
        let lo = values.iter().copied().fold(f32::INFINITY, f32::min);
        let hi = values.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        match self {
            Shading::Stretch => (lo, hi),
            Shading::Signed => {
                let m = lo.abs().max(hi.abs());
                (-m, m)
            }
        }
    }
}

/// The gray level of `v` on a scale from `lo` (0, black) to `hi` (255, white):
/// `round(255 (v - lo) / (hi - lo))`, clamped; 0 for an empty range.
pub fn gray_level(v: f32, lo: f32, hi: f32) -> u8 {
    if hi > lo && v.is_finite() {
        (255.0 * (v - lo) / (hi - lo)).round().clamp(0.0, 255.0) as u8
    } else {
        0
    }
}

/// One map of a grid: `rows x cols` values, row-major, drawn `zoom` pixels per value.
#[derive(Debug, Clone)]
pub struct Tile {
    pub values: Vec<f32>,
    pub rows: usize,
    pub cols: usize,
    pub zoom: u32,
    pub shading: Shading,
    pub caption: String,
}

impl Tile {
    /// The value range drawn black to white (see [`Shading`]).
    pub fn range(&self) -> (f32, f32) {
        self.shading.range(&self.values)
    }
}

/// A rendered picture and, for grids, where each tile's top-left value was drawn.
pub struct Picture {
    pub image: RgbImage,
    pub tile_origins: Vec<(u32, u32)>,
}

impl Picture {
    /// Writes the picture as a PNG file, atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        crate::atomic::write(path, &encode_png(&self.image)?)
    }
}

/// The PNG bytes of an RGB image.
pub fn encode_png(image: &RgbImage) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    image::codecs::png::PngEncoder::new(&mut bytes)
        .write_image(image.as_raw(), image.width(), image.height(), image::ExtendedColorType::Rgb8)
        .context("encoding a PNG")?;
    Ok(bytes)
}

/// Tiles laid out in `columns` columns under `title`, each with its caption below it.
/// The tiles may differ in size; each sits centred in a cell as large as the largest, and the
/// first cell's corner is always at (MARGIN, TITLE_BAND) whatever the title.
pub fn grid(title: &str, tiles: &[Tile], columns: usize) -> Result<Picture> {
    ensure!(!tiles.is_empty() && columns > 0, "{title}: nothing to draw");
    for t in tiles {
        ensure!(
            t.values.len() == t.rows * t.cols && t.zoom > 0,
            "{title}: tile {:?} holds {} values for {}x{}",
            t.caption,
            t.values.len(),
            t.rows,
            t.cols
        );
    }
    let columns = columns.min(tiles.len());
    let rows = tiles.len().div_ceil(columns);
    let cell_w = tiles
        .iter()
        .map(|t| (t.cols as u32 * t.zoom).max(text_width(&t.caption, CAPTION_SIZE, false) + 4))
        .max()
        .unwrap_or(1);
    let cell_h = tiles.iter().map(|t| t.rows as u32 * t.zoom).max().unwrap_or(1);
    let grid_w = columns as u32 * cell_w + (columns as u32 - 1) * GAP;
    let width = 2 * MARGIN + grid_w.max(text_width(title, TITLE_SIZE, true));
    let height = TITLE_BAND + rows as u32 * (cell_h + CAPTION_BAND) + (rows as u32 - 1) * GAP + MARGIN;
    // Left-aligned under a left-aligned title, so where a tile sits does not depend on the title.
    let left = MARGIN;
    let cell_origin = |i: usize| -> (u32, u32) {
        let (r, c) = ((i / columns) as u32, (i % columns) as u32);
        (left + c * (cell_w + GAP), TITLE_BAND + r * (cell_h + CAPTION_BAND + GAP))
    };

    let mut rgb = vec![255u8; (width * height * 3) as usize];
    {
        let area = Canvas::new(&mut rgb, (width, height)).into_drawing_area();
        let style =
            TextStyle::from(font(TITLE_SIZE).style(FontStyle::Bold)).color(&BLACK).pos(Pos::new(HPos::Left, VPos::Top));
        area.draw_text(title, &style, (MARGIN as i32, 8)).map_err(|e| anyhow!("drawing the title {title:?}: {e}"))?;
        for (i, t) in tiles.iter().enumerate() {
            let (x, y) = cell_origin(i);
            centred_text(&area, &t.caption, CAPTION_SIZE, ((x + cell_w / 2) as i32, (y + cell_h + 3) as i32), false)?;
        }
        area.present().map_err(|e| anyhow!("{title}: {e}"))?;
    }
    let mut image = RgbImage::from_raw(width, height, rgb).context("the canvas has width * height * 3 bytes")?;
    let mut tile_origins = Vec::with_capacity(tiles.len());
    for (i, t) in tiles.iter().enumerate() {
        let (cx, cy) = cell_origin(i);
        let (tw, th) = (t.cols as u32 * t.zoom, t.rows as u32 * t.zoom);
        let (x0, y0) = (cx + (cell_w - tw) / 2, cy + (cell_h - th) / 2);
        // A thin frame just outside the tile, so white values do not melt into the page.
        for x in x0 - 1..=x0 + tw {
            image.put_pixel(x, y0 - 1, FRAME);
            image.put_pixel(x, y0 + th, FRAME);
        }
        for y in y0 - 1..=y0 + th {
            image.put_pixel(x0 - 1, y, FRAME);
            image.put_pixel(x0 + tw, y, FRAME);
        }
        let (lo, hi) = t.range();
        for (k, &v) in t.values.iter().enumerate() {
            let g = gray_level(v, lo, hi);
            let (r, c) = ((k / t.cols) as u32, (k % t.cols) as u32);
            for dy in 0..t.zoom {
                for dx in 0..t.zoom {
                    image.put_pixel(x0 + c * t.zoom + dx, y0 + r * t.zoom + dy, image::Rgb([g, g, g]));
                }
            }
        }
        tile_origins.push((x0, y0));
    }
    Ok(Picture { image, tile_origins })
}

/// A short decimal for labels: at most `digits` decimals, trailing zeros dropped.
pub fn short_number(v: f64, digits: usize) -> String {
    let s = format!("{v:.digits$}");
    let s = if s.contains('.') { s.trim_end_matches('0').trim_end_matches('.').to_string() } else { s };
    if s == "-0" {
        "0".into()
    } else {
        s
    }
}

/// Renders `draw` on a white `width x height` canvas.
fn chart(width: u32, height: u32, draw: impl FnOnce(&DrawingArea<Canvas, Shift>) -> Result<()>) -> Result<Picture> {
    fonts();
    let mut rgb = vec![255u8; (width * height * 3) as usize];
    {
        let area = Canvas::new(&mut rgb, (width, height)).into_drawing_area();
        draw(&area)?;
        area.present().map_err(|e| anyhow!("{e}"))?;
    }
    let image = RgbImage::from_raw(width, height, rgb).context("the canvas has width * height * 3 bytes")?;
    Ok(Picture { image, tile_origins: vec![] })
}

fn plot_err<E: std::fmt::Display>(what: &str) -> impl Fn(E) -> anyhow::Error + '_ {
    move |e| anyhow!("drawing {what}: {e}")
}

const BAR: RGBColor = RGBColor(0x9e, 0xb9, 0xd4);
const HIGHLIGHT: RGBColor = RGBColor(0x1f, 0x5f, 0xa8);
const TRAIN: RGBColor = RGBColor(0x1f, 0x77, 0xb4);
const TEST: RGBColor = RGBColor(0xd6, 0x27, 0x28);

/// A bar per class with its probability written above it; the most likely class stands out.
pub fn bar_chart(title: &str, labels: &[String], probabilities: &[f64]) -> Result<Picture> {
    ensure!(
        labels.len() == probabilities.len() && !labels.is_empty(),
        "{title}: {} labels for {} bars",
        labels.len(),
        probabilities.len()
    );
    let n = labels.len();
    let best = (0..n).max_by(|&a, &b| probabilities[a].total_cmp(&probabilities[b])).unwrap_or(0);
    let top = probabilities.iter().copied().fold(1.0f64, f64::max) * 1.1;
    chart(640, 400, |area| {
        let err = plot_err(title);
        area.fill(&WHITE).map_err(&err)?;
        let mut chart = ChartBuilder::on(area)
            .caption(title, font(TITLE_SIZE).style(FontStyle::Bold))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(50)
            .build_cartesian_2d(-0.5f64..n as f64 - 0.5, 0f64..top)
            .map_err(&err)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(n)
            .x_label_formatter(&|x| {
                let i = x.round();
                if (x - i).abs() < 1e-6 && i >= 0.0 && (i as usize) < n {
                    labels[i as usize].clone()
                } else {
                    String::new()
                }
            })
            .x_desc("class")
            .y_desc("probability")
            .label_style(font(14.0))
            .axis_desc_style(font(14.0))
            .draw()
            .map_err(&err)?;
        chart
            .draw_series((0..n).map(|i| {
                let colour = if i == best { HIGHLIGHT } else { BAR };
                Rectangle::new([(i as f64 - 0.35, 0.0), (i as f64 + 0.35, probabilities[i])], colour.filled())
            }))
            .map_err(&err)?;
        let label = TextStyle::from(font(12.0)).pos(Pos::new(HPos::Center, VPos::Bottom));
        chart
            .draw_series((0..n).map(|i| {
                Text::new(
                    format!("{:.1}%", 100.0 * probabilities[i]),
                    (i as f64, probabilities[i] + 0.01 * top),
                    label.clone(),
                )
            }))
            .map_err(&err)?;
        Ok(())
    })
}

/// One line of a curve chart: a name and its `(x, y)` points.
pub struct Series<'a> {
    pub name: &'a str,
    pub points: Vec<(f64, f64)>,
}

/// Loss (left) and accuracy (right) against the epoch, train and test lines in each.
pub fn curves(title: &str, loss: &[Series], accuracy: &[Series]) -> Result<Picture> {
    let all = loss.iter().chain(accuracy).flat_map(|s| s.points.iter());
    ensure!(all.clone().count() > 0, "{title}: no points to draw");
    let last_x = all.map(|p| p.0).fold(1.0f64, f64::max);
    chart(960, 420, |area| {
        let err = plot_err(title);
        area.fill(&WHITE).map_err(&err)?;
        let area = area.titled(title, font(TITLE_SIZE).style(FontStyle::Bold)).map_err(&err)?;
        let panels = area.split_evenly((1, 2));
        // Loss falls and accuracy rises: each legend goes in the corner its lines leave empty.
        let panels_content = [
            (loss, "loss", SeriesLabelPosition::UpperRight),
            (accuracy, "accuracy (%)", SeriesLabelPosition::LowerRight),
        ];
        for (panel, (series, what, corner)) in panels.iter().zip(panels_content) {
            let ys = series.iter().flat_map(|s| s.points.iter().map(|p| p.1));
            let (lo, hi) = ys.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), y| (lo.min(y), hi.max(y)));
            let pad = ((hi - lo) * 0.1).max(1e-3);
            let mut chart = ChartBuilder::on(panel)
                .margin(14)
                .x_label_area_size(40)
                .y_label_area_size(56)
                .build_cartesian_2d(0.5f64..last_x + 0.5, (lo - pad)..(hi + pad))
                .map_err(&err)?;
            chart
                .configure_mesh()
                .x_labels((last_x as usize).min(12) + 1)
                .x_label_formatter(&|x| if x.fract() == 0.0 && *x >= 1.0 { format!("{x:.0}") } else { String::new() })
                .x_desc("epoch")
                .y_desc(what)
                .label_style(font(13.0))
                .axis_desc_style(font(14.0))
                .draw()
                .map_err(&err)?;
            for (s, colour) in series.iter().zip([TRAIN, TEST]) {
                chart
                    .draw_series(LineSeries::new(s.points.iter().copied(), colour.stroke_width(2)))
                    .map_err(&err)?
                    .label(s.name)
                    .legend(move |(x, y)| PathElement::new([(x, y), (x + 18, y)], colour.stroke_width(2)));
                chart.draw_series(s.points.iter().map(|&p| Circle::new(p, 3, colour.filled()))).map_err(&err)?;
            }
            chart
                .configure_series_labels()
                .position(corner)
                .label_font(font(13.0))
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK.mix(0.3))
                .draw()
                .map_err(&err)?;
        }
        Ok(())
    })
}

/// The colour of a heat-map cell holding `share` (0..=1) of its row: white to dark blue.
pub fn heat_colour(share: f64) -> RGBColor {
    let t = share.clamp(0.0, 1.0).sqrt(); // square root: the few errors still show
    let mix = |from: f64, to: f64| (from + (to - from) * t).round() as u8;
    RGBColor(mix(255.0, 0x08 as f64), mix(255.0, 0x30 as f64), mix(255.0, 0x6b as f64))
}

/// Heat-map geometry: cell side, and the left and top edges of cell (0, 0).
pub const HEAT_CELL: u32 = 44;
pub const HEAT_LEFT: u32 = 90;
pub const HEAT_TOP: u32 = 70;

/// A confusion matrix `counts[true][predicted]` as a heat map, each cell coloured by its share
/// of the true class (square-root scale) and labelled with its count.
pub fn heat_map(title: &str, labels: &[String], counts: &[Vec<i64>]) -> Result<Picture> {
    let n = labels.len();
    ensure!(n > 0 && counts.len() == n && counts.iter().all(|r| r.len() == n), "{title}: the matrix is not {n}x{n}");
    let (cell, left, top) = (HEAT_CELL, HEAT_LEFT, HEAT_TOP);
    let width = (left + n as u32 * cell + 30).max(text_width(title, TITLE_SIZE, true) + 2 * MARGIN);
    let height = top + n as u32 * cell + 60;
    chart(width, height, |area| {
        let err = plot_err(title);
        area.fill(&WHITE).map_err(&err)?;
        centred_text(area, title, TITLE_SIZE, (width as i32 / 2, 8), true)?;
        let middle = (left + n as u32 * cell / 2) as i32;
        centred_text(area, "predicted", 14.0, (middle, top as i32 - 40), false)?;
        for (i, row) in counts.iter().enumerate() {
            let total = row.iter().sum::<i64>().max(1) as f64;
            for (j, &count) in row.iter().enumerate() {
                let (x, y) = ((left + j as u32 * cell) as i32, (top + i as u32 * cell) as i32);
                let share = count as f64 / total;
                area.draw(&Rectangle::new([(x, y), (x + cell as i32, y + cell as i32)], heat_colour(share).filled()))
                    .map_err(&err)?;
                area.draw(&Rectangle::new([(x, y), (x + cell as i32, y + cell as i32)], BLACK.mix(0.15)))
                    .map_err(&err)?;
                let ink = if share.sqrt() > 0.55 { WHITE } else { BLACK };
                let style = TextStyle::from(font(13.0)).color(&ink).pos(Pos::new(HPos::Center, VPos::Center));
                area.draw_text(&count.to_string(), &style, (x + cell as i32 / 2, y + cell as i32 / 2)).map_err(&err)?;
            }
            let y = (top + i as u32 * cell + cell / 2) as i32 - 7;
            centred_text(area, &labels[i], 14.0, (left as i32 - 16, y), false)?;
            centred_text(area, &labels[i], 14.0, ((left + i as u32 * cell + cell / 2) as i32, top as i32 - 20), false)?;
        }
        let style = TextStyle::from(font(14.0))
            .color(&BLACK)
            .pos(Pos::new(HPos::Center, VPos::Center))
            .transform(FontTransform::Rotate270);
        area.draw_text("true", &style, (24, (top + n as u32 * cell / 2) as i32)).map_err(&err)?;
        centred_text(
            area,
            "colour: share of the true class (square-root scale)",
            12.0,
            (middle, (top + n as u32 * cell + 14) as i32),
            false,
        )?;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gray_levels_span_the_range() {
        assert_eq!(gray_level(-1.0, -1.0, 3.0), 0);
        assert_eq!(gray_level(3.0, -1.0, 3.0), 255);
        assert_eq!(gray_level(1.0, -1.0, 3.0), 128); // 127.5 rounds up
        assert_eq!(gray_level(5.0, 5.0, 5.0), 0);
        assert_eq!(Shading::Signed.range(&[-0.5, 0.25]), (-0.5, 0.5));
        assert_eq!(Shading::Stretch.range(&[-0.5, 0.25]), (-0.5, 0.25));
    }

    #[test]
    fn grid_tiles_are_nearest_neighbour_blocks_at_their_origins() {
        let tile =
            |v: Vec<f32>| Tile { rows: 2, cols: 2, zoom: 5, shading: Shading::Stretch, caption: "t".into(), values: v };
        let pic = grid("two tiles", &[tile(vec![0.0, 1.0, 2.0, 3.0]), tile(vec![3.0, 2.0, 1.0, 0.0])], 2).unwrap();
        assert_eq!(pic.tile_origins.len(), 2);
        for (t, &(x0, y0)) in pic.tile_origins.iter().enumerate() {
            for k in 0..4u32 {
                let v = if t == 0 { k } else { 3 - k } as f32;
                let expected = gray_level(v, 0.0, 3.0);
                for (dx, dy) in [(0, 0), (4, 4), (2, 3)] {
                    let p = pic.image.get_pixel(x0 + (k % 2) * 5 + dx, y0 + (k / 2) * 5 + dy);
                    assert_eq!(p.0, [expected; 3], "tile {t} value {k}");
                }
            }
        }
    }

    #[test]
    fn text_is_drawn_with_the_embedded_font() {
        // A title must put dark pixels into the title band: proof the font loaded and renders.
        let tile =
            Tile { rows: 1, cols: 1, zoom: 4, shading: Shading::Stretch, caption: String::new(), values: vec![1.0] };
        let pic = grid("Hello", &[tile], 1).unwrap();
        let dark = (0..pic.image.width())
            .flat_map(|x| (0..TITLE_BAND).map(move |y| (x, y)))
            .filter(|&(x, y)| pic.image.get_pixel(x, y).0[0] < 100)
            .count();
        assert!(dark > 30, "only {dark} dark pixels in the title band");
        assert!(text_width("Hello", TITLE_SIZE, true) > 30);
    }

    #[test]
    fn charts_render_at_their_size() {
        let labels: Vec<String> = (0..10).map(|i| i.to_string()).collect();
        let probs: Vec<f64> = (0..10).map(|i| if i == 3 { 0.91 } else { 0.01 }).collect();
        let bars = bar_chart("p", &labels, &probs).unwrap();
        assert_eq!(bars.image.dimensions(), (640, 400));
        let counts: Vec<Vec<i64>> = (0..10).map(|i| (0..10).map(|j| if i == j { 90 } else { 1 }).collect()).collect();
        let heat = heat_map("c", &labels, &counts).unwrap();
        assert_eq!(heat.image.dimensions(), (90 + 440 + 30, 70 + 440 + 60));
        // The diagonal cell (0, 0) is dark, the off-diagonal (0, 1) light.
        assert!(heat.image.get_pixel(92, 72).0[0] < 60);
        assert!(heat.image.get_pixel(90 + 44 + 2, 72).0[0] > 150);
        let s = |name, pts: Vec<(f64, f64)>| Series { name, points: pts };
        let c = curves(
            "run",
            &[s("train", vec![(1.0, 0.5), (2.0, 0.2)]), s("test", vec![(1.0, 0.4), (2.0, 0.3)])],
            &[s("train", vec![(1.0, 90.0), (2.0, 95.0)])],
        )
        .unwrap();
        assert_eq!(c.image.dimensions(), (960, 420));
        assert_eq!(short_number(2.50, 2), "2.5");
        assert_eq!(short_number(-0.001, 2), "0");
    }
}
