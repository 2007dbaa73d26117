//! A small H.264 encoder (Constrained Baseline profile, CAVLC) for the simulator's videos.
//!
//! It is lossless by construction and needs no transform coding: every macroblock is either
//! I_PCM (its raw samples) or an exact copy of the previous frame (P_Skip, or P_L0_16x16 with a
//! whole-pixel motion vector and no residual), and a copy is chosen only where the decoder's
//! prediction equals the source sample for sample. Placeholder videos move by whole pixels, so
//! most macroblocks of a frame are copies and the file stays small.

use image::RgbImage;

/// Frames between two IDR pictures at most (a keyframe about every two seconds).
const KEYFRAME_SECONDS: f64 = 2.0;
/// `log2_max_frame_num_minus4` of the SPS: frame_num counts modulo 256.
const LOG2_MAX_FRAME_NUM: u32 = 8;
/// Whole-pixel shifts tried as the frame's global motion (luma pixels, even so chroma stays whole).
const SEARCH_RANGE: i32 = 16;

/// A frame in 4:2:0, padded to whole macroblocks (padding repeats the edge pixels).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Picture {
    /// Size shown (even, at least 2 x 2); the padding is cropped away by the SPS.
    pub width: u32,
    pub height: u32,
    mb_w: usize,
    mb_h: usize,
    y: Vec<u8>,
    u: Vec<u8>,
    v: Vec<u8>,
}

/// BT.709, limited range (what the SPS's VUI announces).
fn ycbcr(p: [u8; 3]) -> (i32, i32, i32) {
    let (r, g, b) = (i32::from(p[0]), i32::from(p[1]), i32::from(p[2]));
    (
        ((47 * r + 157 * g + 16 * b + 128) >> 8) + 16,
        ((-26 * r - 87 * g + 113 * b + 128) >> 8) + 128,
        ((113 * r - 103 * g - 10 * b + 128) >> 8) + 128,
    )
}

impl Picture {
    /// `img` as a picture of `width` x `height` (each rounded down to even, at least 2): pixels
    /// beyond the image repeat its last row or column.
    pub fn from_rgb(img: &RgbImage) -> Self {
        let (iw, ih) = (img.width() as usize, img.height() as usize);
        let width = (img.width() & !1).max(2);
        let height = (img.height() & !1).max(2);
        let mb_w = width.div_ceil(16) as usize;
        let mb_h = height.div_ceil(16) as usize;
        let (pw, ph) = (mb_w * 16, mb_h * 16);
        // Samples past the shown area repeat its last row and column, so cropping shows only
        // real pixels (a 1-pixel image repeats its one pixel).
        let last_x = (width as usize - 1).min(iw.saturating_sub(1));
        let last_y = (height as usize - 1).min(ih.saturating_sub(1));
        let raw = img.as_raw();
        let mut y_plane = vec![0u8; pw * ph];
        let mut u_plane = vec![0u8; pw * ph / 4];
        let mut v_plane = vec![0u8; pw * ph / 4];
        // Full-resolution chroma of two rows, averaged into one chroma row.
        let mut cb = vec![0i32; 2 * pw];
        let mut cr = vec![0i32; 2 * pw];
        for y in 0..ph {
            let src_y = y.min(last_y);
            let half = (y & 1) * pw;
            let out = &mut y_plane[y * pw..(y + 1) * pw];
            if iw == 0 || ih == 0 {
                out.fill(16);
                cb[half..half + pw].fill(128);
                cr[half..half + pw].fill(128);
            } else {
                let row = &raw[src_y * iw * 3..(src_y * iw + last_x + 1) * 3];
                let (cb_row, cr_row) = (&mut cb[half..half + pw], &mut cr[half..half + pw]);
                for (x, px) in row.chunks_exact(3).enumerate() {
                    let (l, b, r) = ycbcr([px[0], px[1], px[2]]);
                    out[x] = l.clamp(16, 235) as u8;
                    cb_row[x] = b;
                    cr_row[x] = r;
                }
                // The padding repeats the last column.
                let n = last_x + 1;
                let (l, b, r) = (out[n - 1], cb_row[n - 1], cr_row[n - 1]);
                out[n..].fill(l);
                cb_row[n..].fill(b);
                cr_row[n..].fill(r);
            }
            if y & 1 == 1 {
                let crow = (y / 2) * pw / 2;
                for cx in 0..pw / 2 {
                    let avg = |p: &[i32]| {
                        ((p[2 * cx] + p[2 * cx + 1] + p[pw + 2 * cx] + p[pw + 2 * cx + 1] + 2) >> 2)
                            .clamp(16, 240) as u8
                    };
                    u_plane[crow + cx] = avg(&cb);
                    v_plane[crow + cx] = avg(&cr);
                }
            }
        }
        Self {
            width,
            height,
            mb_w,
            mb_h,
            y: y_plane,
            u: u_plane,
            v: v_plane,
        }
    }

    fn luma_stride(&self) -> usize {
        self.mb_w * 16
    }

    /// Luma sample with the decoder's clamping at the picture edges.
    fn luma_at(&self, x: i32, y: i32) -> u8 {
        let w = self.luma_stride() as i32;
        let h = (self.mb_h * 16) as i32;
        self.y[(y.clamp(0, h - 1) * w + x.clamp(0, w - 1)) as usize]
    }

    fn chroma_at(plane: &[u8], stride: usize, rows: usize, x: i32, y: i32) -> u8 {
        plane
            [y.clamp(0, rows as i32 - 1) as usize * stride + x.clamp(0, stride as i32 - 1) as usize]
    }
}

/// Writes bits most significant first, with H.264's Exp-Golomb codes.
#[derive(Default)]
struct Bits {
    out: Vec<u8>,
    acc: u64,
    n: u32,
}

impl Bits {
    fn u(&mut self, bits: u32, value: u64) {
        for i in (0..bits).rev() {
            self.acc = (self.acc << 1) | ((value >> i) & 1);
            self.n += 1;
            if self.n == 8 {
                self.out.push(self.acc as u8);
                self.acc = 0;
                self.n = 0;
            }
        }
    }

    fn flag(&mut self, b: bool) {
        self.u(1, u64::from(b));
    }

    fn ue(&mut self, v: u64) {
        let x = v + 1;
        let len = 64 - x.leading_zeros();
        self.u(len - 1, 0);
        self.u(len, x);
    }

    fn se(&mut self, v: i64) {
        let k = if v > 0 { 2 * v - 1 } else { -2 * v };
        self.ue(k as u64);
    }

    fn aligned(&self) -> bool {
        self.n == 0
    }

    fn align_zero(&mut self) {
        while !self.aligned() {
            self.u(1, 0);
        }
    }

    fn bytes(&mut self, data: &[u8]) {
        debug_assert!(self.aligned());
        self.out.extend_from_slice(data);
    }

    /// `rbsp_trailing_bits`: a stop bit, then zeros to the byte boundary.
    fn finish(mut self) -> Vec<u8> {
        self.u(1, 1);
        self.align_zero();
        self.out
    }
}

/// A NAL unit: header byte, then the RBSP with emulation prevention bytes.
fn nal(ref_idc: u8, kind: u8, rbsp: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(rbsp.len() + rbsp.len() / 64 + 1);
    out.push((ref_idc << 5) | kind);
    let mut zeros = 0;
    for &b in rbsp {
        if zeros >= 2 && b <= 3 {
            out.push(3);
            zeros = 0;
        }
        out.push(b);
        zeros = if b == 0 { zeros + 1 } else { 0 };
    }
    out
}

/// The lowest level (×10) whose frame size and macroblock rate fit, 3.0 at least.
fn level_idc(mbs: u64, fps: f64) -> u8 {
    const LEVELS: &[(u8, u64, u64)] = &[
        (30, 1620, 40_500),
        (31, 3600, 108_000),
        (32, 5120, 216_000),
        (40, 8192, 245_760),
        (42, 8704, 522_240),
        (50, 22_080, 589_824),
        (51, 36_864, 983_040),
        (52, 36_864, 2_073_600),
    ];
    let rate = (mbs as f64 * fps).ceil() as u64;
    LEVELS
        .iter()
        .find(|(_, fs, mbps)| mbs <= *fs && rate <= *mbps)
        .map_or(52, |(l, _, _)| *l)
}

/// One encoded frame: its NAL units (without start codes or length prefixes).
#[derive(Debug, Clone)]
pub struct AccessUnit {
    pub nals: Vec<Vec<u8>>,
    /// An IDR picture (a sync sample in MP4 terms).
    pub key: bool,
}

/// An encoded stream: parameter sets and one access unit per frame.
#[derive(Debug, Clone)]
pub struct Stream {
    pub sps: Vec<u8>,
    pub pps: Vec<u8>,
    pub width: u32,
    pub height: u32,
    pub frames: Vec<AccessUnit>,
}

/// What the encoder chose for each macroblock (counted for tests and logs).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct MbStats {
    pub pcm: u64,
    pub skip: u64,
    pub inter: u64,
}

fn sps(pic: &Picture, fps: f64) -> Vec<u8> {
    let mut b = Bits::default();
    b.u(8, 66); // profile_idc: Baseline
    b.u(8, 0b1100_0000); // constraint_set0 + constraint_set1: Constrained Baseline
    b.u(8, u64::from(level_idc((pic.mb_w * pic.mb_h) as u64, fps)));
    b.ue(0); // seq_parameter_set_id
    b.ue(u64::from(LOG2_MAX_FRAME_NUM - 4));
    b.ue(2); // pic_order_cnt_type 2: output order = decoding order
    b.ue(1); // max_num_ref_frames
    b.flag(false); // gaps_in_frame_num_value_allowed_flag
    b.ue(pic.mb_w as u64 - 1);
    b.ue(pic.mb_h as u64 - 1);
    b.flag(true); // frame_mbs_only_flag
    b.flag(true); // direct_8x8_inference_flag
    let crop_right = (pic.mb_w as u32 * 16 - pic.width) / 2;
    let crop_bottom = (pic.mb_h as u32 * 16 - pic.height) / 2;
    let crop = crop_right > 0 || crop_bottom > 0;
    b.flag(crop);
    if crop {
        b.ue(0);
        b.ue(u64::from(crop_right));
        b.ue(0);
        b.ue(u64::from(crop_bottom));
    }
    b.flag(true); // vui_parameters_present_flag
    b.flag(false); // aspect_ratio_info_present_flag
    b.flag(false); // overscan_info_present_flag
    b.flag(true); // video_signal_type_present_flag
    b.u(3, 5); // video_format: unspecified
    b.flag(false); // video_full_range_flag: limited range
    b.flag(true); // colour_description_present_flag
    b.u(8, 1); // colour_primaries: BT.709
    b.u(8, 1); // transfer_characteristics: BT.709
    b.u(8, 1); // matrix_coefficients: BT.709
    b.flag(false); // chroma_loc_info_present_flag
    b.flag(true); // timing_info_present_flag
    b.u(32, 1000); // num_units_in_tick
    b.u(32, (fps * 2000.0).round() as u64); // time_scale: two ticks per frame
    b.flag(true); // fixed_frame_rate_flag
    b.flag(false); // nal_hrd_parameters_present_flag
    b.flag(false); // vcl_hrd_parameters_present_flag
    b.flag(false); // pic_struct_present_flag
    b.flag(true); // bitstream_restriction_flag
    b.flag(true); // motion_vectors_over_pic_boundaries_flag
    b.ue(0); // max_bytes_per_pic_denom
    b.ue(0); // max_bits_per_mb_denom
    b.ue(15); // log2_max_mv_length_horizontal
    b.ue(15); // log2_max_mv_length_vertical
    b.ue(0); // max_num_reorder_frames: a frame is shown as soon as it is decoded
    b.ue(1); // max_dec_frame_buffering
    nal(3, 7, &b.finish())
}

fn pps() -> Vec<u8> {
    let mut b = Bits::default();
    b.ue(0); // pic_parameter_set_id
    b.ue(0); // seq_parameter_set_id
    b.flag(false); // entropy_coding_mode_flag: CAVLC
    b.flag(false); // bottom_field_pic_order_in_frame_present_flag
    b.ue(0); // num_slice_groups_minus1
    b.ue(0); // num_ref_idx_l0_default_active_minus1
    b.ue(0); // num_ref_idx_l1_default_active_minus1
    b.flag(false); // weighted_pred_flag
    b.u(2, 0); // weighted_bipred_idc
    b.se(0); // pic_init_qp_minus26
    b.se(0); // pic_init_qs_minus26
    b.se(0); // chroma_qp_index_offset
    // The slice header switches the deblocking filter off: copies and PCM stay exact.
    b.flag(true); // deblocking_filter_control_present_flag
    b.flag(false); // constrained_intra_pred_flag
    b.flag(false); // redundant_pic_cnt_present_flag
    nal(3, 8, &b.finish())
}

/// A macroblock's motion as its neighbours' predictions see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Motion {
    Intra,
    /// Reference 0 with this vector (quarter luma pixels).
    Inter(i32, i32),
}

/// `(refIdx, mv)` of a neighbour, `None` when it lies outside the picture.
type Neighbour = Option<(i32, (i32, i32))>;

fn neighbour(m: Option<Motion>) -> Neighbour {
    m.map(|m| match m {
        Motion::Intra => (-1, (0, 0)),
        Motion::Inter(x, y) => (0, (x, y)),
    })
}

fn median(a: i32, b: i32, c: i32) -> i32 {
    a.max(b).min(a.min(b).max(c))
}

/// The motion vector predictor of a 16x16 partition (H.264 8.4.1.3).
fn mv_pred(a: Neighbour, b: Neighbour, c: Neighbour) -> (i32, i32) {
    let (b, c) = if b.is_none() && c.is_none() && a.is_some() {
        (a, a)
    } else {
        (b, c)
    };
    let [a, b, c] = [a, b, c].map(|n| n.unwrap_or((-1, (0, 0))));
    let same: Vec<_> = [a, b, c].into_iter().filter(|n| n.0 == 0).collect();
    if same.len() == 1 {
        return same[0].1;
    }
    (median(a.1.0, b.1.0, c.1.0), median(a.1.1, b.1.1, c.1.1))
}

struct Encoder<'a> {
    cur: &'a Picture,
    prev: &'a Picture,
    motion: Vec<Option<Motion>>,
}

impl Encoder<'_> {
    fn at(&self, mx: i64, my: i64) -> Option<Motion> {
        if mx < 0 || my < 0 || mx >= self.cur.mb_w as i64 {
            return None;
        }
        self.motion
            .get(my as usize * self.cur.mb_w + mx as usize)
            .copied()
            .flatten()
    }

    /// (A, B, C-or-D) neighbours of macroblock (mx, my).
    fn neighbours(&self, mx: usize, my: usize) -> (Neighbour, Neighbour, Neighbour) {
        let (x, y) = (mx as i64, my as i64);
        let a = neighbour(self.at(x - 1, y));
        let b = neighbour(self.at(x, y - 1));
        let c = match self.at(x + 1, y - 1) {
            Some(m) => Some(m),
            None => self.at(x - 1, y - 1),
        };
        (a, b, neighbour(c))
    }

    /// The vector a P_Skip macroblock gets (H.264 8.4.1.1).
    fn skip_mv(&self, mx: usize, my: usize) -> (i32, i32) {
        let (a, b, c) = self.neighbours(mx, my);
        match (a, b) {
            (None, _) | (_, None) => (0, 0),
            (Some((0, (0, 0))), _) | (_, Some((0, (0, 0)))) => (0, 0),
            _ => mv_pred(a, b, c),
        }
    }

    /// Whether copying from the previous frame with `mv` reproduces macroblock (mx, my) exactly.
    fn copies(&self, mx: usize, my: usize, (mvx, mvy): (i32, i32)) -> bool {
        // Only whole luma pixels: the six-tap half-pixel filter is never needed.
        if mvx % 4 != 0 || mvy % 4 != 0 {
            return false;
        }
        let (dx, dy) = (mvx / 4, mvy / 4);
        let stride = self.cur.luma_stride();
        let rows = self.cur.mb_h * 16;
        let (x0, y0) = ((mx * 16) as i32, (my * 16) as i32);
        let inside = x0 + dx >= 0
            && y0 + dy >= 0
            && x0 + dx + 16 <= stride as i32
            && y0 + dy + 16 <= rows as i32;
        if inside {
            // Rows compare as slices (fast even in a debug build).
            fn block(plane: &[u8], stride: usize, x: i32, y: i32, size: usize, r: usize) -> &[u8] {
                let start = (y as usize + r) * stride + x as usize;
                &plane[start..start + size]
            }
            let luma = (0..16).all(|r| {
                let start = (y0 as usize + r) * stride + x0 as usize;
                self.cur.y[start..start + 16]
                    == *block(&self.prev.y, stride, x0 + dx, y0 + dy, 16, r)
            });
            if !luma {
                return false;
            }
            if dx % 2 == 0 && dy % 2 == 0 {
                let cs = stride / 2;
                let (cx, cy) = (x0 / 2, y0 / 2);
                return [(&self.cur.u, &self.prev.u), (&self.cur.v, &self.prev.v)]
                    .into_iter()
                    .all(|(cur, prev)| {
                        (0..8).all(|r| {
                            let start = (cy as usize + r) * cs + cx as usize;
                            cur[start..start + 8]
                                == *block(prev, cs, cx + dx / 2, cy + dy / 2, 8, r)
                        })
                    });
            }
        } else {
            for y in 0..16 {
                for x in 0..16 {
                    let want = self.cur.y[(y0 + y) as usize * stride + (x0 + x) as usize];
                    if want != self.prev.luma_at(x0 + x + dx, y0 + y + dy) {
                        return false;
                    }
                }
            }
        }
        // Chroma vectors are in eighths of a chroma sample: bilinear between four samples.
        let cstride = stride / 2;
        let crows = rows / 2;
        let (xf, yf) = (mvx & 7, mvy & 7);
        for (cur, prev) in [(&self.cur.u, &self.prev.u), (&self.cur.v, &self.prev.v)] {
            for y in 0..8 {
                for x in 0..8 {
                    let cx = (mx * 8 + x) as i32 + (mvx >> 3);
                    let cy = (my * 8 + y) as i32 + (mvy >> 3);
                    let s = |dx, dy| {
                        i32::from(Picture::chroma_at(prev, cstride, crows, cx + dx, cy + dy))
                    };
                    let pred = ((8 - xf) * (8 - yf) * s(0, 0)
                        + xf * (8 - yf) * s(1, 0)
                        + (8 - xf) * yf * s(0, 1)
                        + xf * yf * s(1, 1)
                        + 32)
                        >> 6;
                    if i32::from(cur[(my * 8 + y) * cstride + mx * 8 + x]) != pred {
                        return false;
                    }
                }
            }
        }
        true
    }

    /// The whole-pixel shift (quarter-pixel units) that explains most of the frame: the one
    /// under which most 16-pixel row segments of every fourth row reappear unchanged.
    fn global_motion(&self) -> (i32, i32) {
        let w = self.cur.luma_stride();
        let h = self.cur.mb_h * 16;
        let score = |dx: i32, dy: i32| -> usize {
            (0..h)
                .step_by(4)
                .filter(|y| (0..h as i32).contains(&(*y as i32 + dy)))
                .map(|y| {
                    let src = (y as i32 + dy) as usize * w;
                    (0..w / 16)
                        .filter(|seg| {
                            let x = (seg * 16) as i32 + dx;
                            x >= 0
                                && x as usize + 16 <= w
                                && self.cur.y[y * w + seg * 16..y * w + seg * 16 + 16]
                                    == self.prev.y[src + x as usize..src + x as usize + 16]
                        })
                        .count()
                })
                .sum()
        };
        let mut best = ((0, 0), score(0, 0));
        for d in (-SEARCH_RANGE..=SEARCH_RANGE)
            .step_by(2)
            .filter(|d| *d != 0)
        {
            for (dx, dy) in [(d, 0), (0, d)] {
                let s = score(dx, dy);
                if s > best.1 {
                    best = ((dx, dy), s);
                }
            }
        }
        (best.0.0 * 4, best.0.1 * 4)
    }
}

fn pcm(b: &mut Bits, pic: &Picture, mx: usize, my: usize) {
    b.align_zero();
    let stride = pic.luma_stride();
    for y in 0..16 {
        let row = (my * 16 + y) * stride + mx * 16;
        b.bytes(&pic.y[row..row + 16]);
    }
    for plane in [&pic.u, &pic.v] {
        for y in 0..8 {
            let row = (my * 8 + y) * stride / 2 + mx * 8;
            b.bytes(&plane[row..row + 8]);
        }
    }
}

fn slice_header(b: &mut Bits, idr: Option<u64>, frame_num: u64) {
    b.ue(0); // first_mb_in_slice
    b.ue(if idr.is_some() { 7 } else { 5 }); // slice_type: I or P (all slices alike)
    b.ue(0); // pic_parameter_set_id
    b.u(LOG2_MAX_FRAME_NUM, frame_num);
    match idr {
        Some(id) => {
            b.ue(id); // idr_pic_id
            b.flag(false); // no_output_of_prior_pics_flag
            b.flag(false); // long_term_reference_flag
        }
        None => {
            b.flag(false); // num_ref_idx_active_override_flag
            b.flag(false); // ref_pic_list_modification_flag_l0
            b.flag(false); // adaptive_ref_pic_marking_mode_flag
        }
    }
    b.se(0); // slice_qp_delta
    b.ue(1); // disable_deblocking_filter_idc: off
}

fn idr_slice(pic: &Picture, idr_id: u64, stats: &mut MbStats) -> Vec<u8> {
    let mut b = Bits::default();
    slice_header(&mut b, Some(idr_id), 0);
    for my in 0..pic.mb_h {
        for mx in 0..pic.mb_w {
            b.ue(25); // mb_type I_PCM
            pcm(&mut b, pic, mx, my);
            stats.pcm += 1;
        }
    }
    nal(3, 5, &b.finish())
}

fn p_slice(cur: &Picture, prev: &Picture, frame_num: u64, stats: &mut MbStats) -> Vec<u8> {
    let mut b = Bits::default();
    slice_header(&mut b, None, frame_num);
    let mut enc = Encoder {
        cur,
        prev,
        motion: vec![None; cur.mb_w * cur.mb_h],
    };
    let global = enc.global_motion();
    let mut skip_run = 0u64;
    for my in 0..cur.mb_h {
        for mx in 0..cur.mb_w {
            let idx = my * cur.mb_w + mx;
            let skip = enc.skip_mv(mx, my);
            if enc.copies(mx, my, skip) {
                enc.motion[idx] = Some(Motion::Inter(skip.0, skip.1));
                skip_run += 1;
                stats.skip += 1;
                continue;
            }
            b.ue(skip_run);
            skip_run = 0;
            let (a, bn, c) = enc.neighbours(mx, my);
            let pred = mv_pred(a, bn, c);
            match [pred, global, (0, 0)]
                .into_iter()
                .find(|mv| enc.copies(mx, my, *mv))
            {
                Some(mv) => {
                    b.ue(0); // mb_type P_L0_16x16 (one reference: no ref_idx)
                    b.se(i64::from(mv.0 - pred.0));
                    b.se(i64::from(mv.1 - pred.1));
                    b.ue(0); // coded_block_pattern 0: no residual
                    enc.motion[idx] = Some(Motion::Inter(mv.0, mv.1));
                    stats.inter += 1;
                }
                None => {
                    b.ue(30); // mb_type I_PCM in a P slice (5 + 25)
                    pcm(&mut b, cur, mx, my);
                    enc.motion[idx] = Some(Motion::Intra);
                    stats.pcm += 1;
                }
            }
        }
    }
    if skip_run > 0 {
        b.ue(skip_run);
    }
    nal(2, 1, &b.finish())
}

/// Encode `frames` (all the size of the first; others are resized) at `fps` frames per second.
pub fn encode(frames: &[RgbImage], fps: f64) -> (Stream, MbStats) {
    let fps = if fps.is_finite() {
        fps.clamp(1.0, 240.0)
    } else {
        25.0
    };
    let first = frames.first().map(RgbImage::dimensions).unwrap_or((2, 2));
    let gop = ((fps * KEYFRAME_SECONDS).round() as usize).max(1);
    let mut stats = MbStats::default();
    let mut out = Vec::with_capacity(frames.len());
    let mut prev: Option<Picture> = None;
    let mut idr_id = 0u64;
    let blank = RgbImage::new(first.0, first.1);
    let sources: Vec<&RgbImage> = if frames.is_empty() {
        vec![&blank]
    } else {
        frames.iter().collect()
    };
    let mut params = None;
    for (i, img) in sources.into_iter().enumerate() {
        let pic = if img.dimensions() == first {
            Picture::from_rgb(img)
        } else {
            Picture::from_rgb(&image::imageops::resize(
                img,
                first.0,
                first.1,
                image::imageops::FilterType::Triangle,
            ))
        };
        if params.is_none() {
            params = Some((sps(&pic, fps), pps(), pic.width, pic.height));
        }
        let unit = match prev.as_ref().filter(|_| i % gop != 0) {
            Some(p) => AccessUnit {
                nals: vec![p_slice(
                    &pic,
                    p,
                    (i % gop) as u64 % (1 << LOG2_MAX_FRAME_NUM),
                    &mut stats,
                )],
                key: false,
            },
            None => {
                let unit = AccessUnit {
                    nals: vec![idr_slice(&pic, idr_id, &mut stats)],
                    key: true,
                };
                idr_id = (idr_id + 1) % 65_536;
                unit
            }
        };
        out.push(unit);
        prev = Some(pic);
    }
    let (sps, pps, width, height) = params.expect("at least one frame was encoded");
    (
        Stream {
            sps,
            pps,
            width,
            height,
            frames: out,
        },
        stats,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bits(f: impl FnOnce(&mut Bits)) -> Vec<u8> {
        let mut b = Bits::default();
        f(&mut b);
        b.align_zero();
        b.out
    }

    #[test]
    fn exp_golomb_codes() {
        // ue: 0 -> 1, 1 -> 010, 2 -> 011, 3 -> 00100; se: 1 -> 010, -1 -> 011.
        assert_eq!(bits(|b| b.ue(0)), [0b1000_0000]);
        assert_eq!(bits(|b| b.ue(1)), [0b0100_0000]);
        assert_eq!(bits(|b| b.ue(2)), [0b0110_0000]);
        assert_eq!(bits(|b| b.ue(3)), [0b0010_0000]);
        assert_eq!(bits(|b| b.ue(25)), [0b0000_1101, 0]);
        assert_eq!(bits(|b| b.se(1)), [0b0100_0000]);
        assert_eq!(bits(|b| b.se(-1)), [0b0110_0000]);
        assert_eq!(bits(|b| b.se(-2)), [0b0010_1000]);
    }

    #[test]
    fn emulation_prevention() {
        assert_eq!(
            nal(3, 5, &[0, 0, 1, 0, 0, 0, 0, 0, 4]),
            [0x65, 0, 0, 3, 1, 0, 0, 3, 0, 0, 3, 0, 4]
        );
    }

    #[test]
    fn predictors_follow_the_standard() {
        let m = |x, y| Some((0, (x, y)));
        // Top row: only the left neighbour exists, it is copied.
        assert_eq!(mv_pred(m(8, 0), None, None), (8, 0));
        // Exactly one neighbour uses reference 0: its vector.
        assert_eq!(
            mv_pred(Some((-1, (0, 0))), m(4, 4), Some((-1, (0, 0)))),
            (4, 4)
        );
        // Otherwise the median.
        assert_eq!(mv_pred(m(8, 0), m(0, 4), m(4, 8)), (4, 4));
        // Left column: A missing counts as reference -1, vector 0.
        assert_eq!(mv_pred(None, m(8, 0), m(8, 0)), (8, 0));
        assert_eq!(median(3, 1, 2), 2);
    }

    #[test]
    fn levels_grow_with_size_and_rate() {
        assert_eq!(level_idc(20 * 14, 25.0), 30);
        assert_eq!(level_idc(120 * 68, 30.0), 40);
        assert_eq!(level_idc(3600, 30.0), 31);
    }

    fn gradient(w: u32, h: u32, shift: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| {
            let t = (x + shift) as u8;
            image::Rgb([t.wrapping_mul(3), (y as u8).wrapping_mul(5), t ^ (y as u8)])
        })
    }

    #[test]
    fn moving_frames_are_copies_and_the_new_edge_is_pcm() {
        // 64x32: 4x2 macroblocks. Each frame shows the content 2 pixels further right.
        let frames: Vec<RgbImage> = (0..4).map(|i| gradient(64, 32, 2 * i)).collect();
        let (stream, stats) = encode(&frames, 25.0);
        assert_eq!(stream.frames.len(), 4);
        assert!(stream.frames[0].key && !stream.frames[1].key);
        // Frame 0 is all PCM (8 macroblocks); later frames copy all but the right column.
        assert_eq!(stats.pcm, 8 + 3 * 2);
        assert_eq!(stats.inter + stats.skip, 3 * 6);
        // A P frame of copies is tiny next to the PCM keyframe.
        let size = |i: usize| stream.frames[i].nals[0].len();
        assert!(size(0) > 8 * 384);
        assert!(size(2) < 2 * 384 + 64, "{}", size(2));
        assert_eq!((stream.width, stream.height), (64, 32));
        // SPS: NAL type 7, Constrained Baseline, level 3.0.
        assert_eq!(stream.sps[..4], [0x67, 66, 0xC0, 30]);
        assert_eq!(stream.pps[0], 0x68);
    }

    #[test]
    fn still_frames_are_skipped_and_odd_sizes_are_cropped() {
        let img = gradient(37, 21, 0);
        let (stream, stats) = encode(&[img.clone(), img.clone(), img], 24.0);
        // 36x20 shown, coded as 3x2 macroblocks.
        assert_eq!((stream.width, stream.height), (36, 20));
        assert_eq!(stats.pcm, 6);
        assert_eq!(stats.skip, 12);
        // A frame of skips: the slice header and one skip run.
        assert!(stream.frames[1].nals[0].len() < 16);
        // Keyframes every two seconds.
        let many: Vec<RgbImage> = (0..50).map(|_| gradient(16, 16, 0)).collect();
        let (s, _) = encode(&many, 10.0);
        let keys: Vec<usize> = (0..50).filter(|i| s.frames[*i].key).collect();
        assert_eq!(keys, [0, 20, 40]);
    }

    #[test]
    fn limited_range_bt709() {
        assert_eq!(ycbcr([0, 0, 0]), (16, 128, 128));
        assert_eq!(ycbcr([255, 255, 255]), (235, 128, 128));
        let (_, cb, cr) = ycbcr([255, 0, 0]);
        assert!(cr > 230 && cb < 110);
    }
}
