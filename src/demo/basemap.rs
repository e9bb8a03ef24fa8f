//! The demo's basemap, as the Basemap Styles service serves one: raster
//! tiles (PNG), vector tiles (Mapbox Vector Tile protobuf), a sprite and
//! glyph ranges, generated here so the demo and the browser tests draw a
//! real basemap with no network. Encoders are the smallest that real
//! renderers (Leaflet, MapLibre GL JS) accept.

/// A 256 × 256 basemap tile: a pale checkerboard of tiles with grid lines,
/// tinted by zoom level.
pub(super) fn tile_png(z: u32, x: u32, y: u32) -> Vec<u8> {
    const SIZE: u32 = 256;
    let tint: [u8; 3] =
        [[0xdd, 0xe8, 0xd5], [0xd5, 0xe3, 0xee], [0xee, 0xe4, 0xd5]][(z % 3) as usize];
    let palette = [
        0xf2, 0xf5, 0xf8, 0xb8, 0xc4, 0xcf, tint[0], tint[1], tint[2],
    ];
    let shade = if (x + y).is_multiple_of(2) { 0u8 } else { 2 };
    png(
        SIZE,
        &palette,
        |row, col| {
            if row == 0 || col == 0 { 1 } else { shade }
        },
    )
}

/// The sprite sheet: one 16 × 16 icon, `park`, a green disc.
pub(super) fn sprite_png() -> Vec<u8> {
    let palette = [0, 0, 0, 0x2a, 0x9d, 0x5f];
    png(16, &palette, |row, col| {
        let (dx, dy) = (col as i32 - 8, row as i32 - 8);
        u8::from(dx * dx + dy * dy <= 49)
    })
}

/// The sprite's index (`sprite.json`): where `park` sits in the sheet.
pub(super) fn sprite_json() -> serde_json::Value {
    serde_json::json!({"park": {"x": 0, "y": 0, "width": 16, "height": 16, "pixelRatio": 1}})
}

/// A square `size` × `size` indexed-colour PNG (signature, IHDR, PLTE,
/// tRNS making index 0 transparent where the palette starts with black,
/// zlib-compressed IDAT, IEND; RFC 2083), pixel colours from `index`.
fn png(size: u32, palette: &[u8], index: impl Fn(u32, u32) -> u8) -> Vec<u8> {
    use std::io::Write;
    let mut raw = Vec::with_capacity(((size + 1) * size) as usize);
    for row in 0..size {
        raw.push(0); // filter type: none
        raw.extend((0..size).map(|col| index(row, col)));
    }
    let mut idat = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    let _ = idat.write_all(&raw);
    let idat = idat.finish().unwrap_or_default();
    let mut ihdr = Vec::with_capacity(13);
    ihdr.extend(size.to_be_bytes());
    ihdr.extend(size.to_be_bytes());
    ihdr.extend([8, 3, 0, 0, 0]); // 8-bit palette indices, no interlace
    let transparent: &[u8] = if palette[..3] == [0, 0, 0] { &[0] } else { &[] };
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    for (kind, data) in [
        (b"IHDR", &ihdr[..]),
        (b"PLTE", palette),
        (b"tRNS", transparent),
        (b"IDAT", &idat[..]),
        (b"IEND", &[][..]),
    ] {
        if kind == b"tRNS" && data.is_empty() {
            continue;
        }
        png.extend((data.len() as u32).to_be_bytes());
        png.extend(kind);
        png.extend(data);
        let mut crc = flate2::Crc::new();
        crc.update(kind);
        crc.update(data);
        png.extend(crc.sum().to_be_bytes());
    }
    png
}

// ------------------------------------------------------------ protobuf

/// Protocol Buffers encoding, the little of it that vector tiles and glyph
/// ranges need: varints, and fields of wire type 0 (varint) and 2 (bytes).
struct Pb(Vec<u8>);

impl Pb {
    fn new() -> Pb {
        Pb(Vec::new())
    }

    fn varint(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.0.push((v as u8) | 0x80);
            v >>= 7;
        }
        self.0.push(v as u8);
    }

    fn uint(&mut self, field: u64, v: u64) {
        self.varint(field << 3);
        self.varint(v);
    }

    fn bytes(&mut self, field: u64, data: &[u8]) {
        self.varint((field << 3) | 2);
        self.varint(data.len() as u64);
        self.0.extend_from_slice(data);
    }

    /// A packed repeated `uint32` field.
    fn packed(&mut self, field: u64, values: &[u32]) {
        let mut inner = Pb::new();
        for &v in values {
            inner.varint(v.into());
        }
        self.bytes(field, &inner.0);
    }
}

/// A vector tile's geometry command (Mapbox Vector Tile 2.1, 4.3).
fn command(id: u32, count: u32) -> u32 {
    (id & 7) | (count << 3)
}

fn zigzag(n: i32) -> u32 {
    ((n << 1) ^ (n >> 31)) as u32
}

/// A vector tile (Mapbox Vector Tile 2.1) for any tile: layer `land`, one
/// polygon covering the tile, and layer `places`, one point at its centre
/// named `Park`, which the style draws with the sprite's icon and a label
/// (so glyphs are fetched too).
pub(super) fn vector_tile() -> Vec<u8> {
    const EXTENT: i32 = 4096;
    let mut land = Pb::new();
    {
        let mut feature = Pb::new();
        feature.uint(1, 1); // id
        feature.uint(3, 3); // type: POLYGON
        feature.packed(
            4,
            &[
                command(1, 1),
                zigzag(0),
                zigzag(0),
                command(2, 3),
                zigzag(EXTENT),
                zigzag(0),
                zigzag(0),
                zigzag(EXTENT),
                zigzag(-EXTENT),
                zigzag(0),
                command(7, 1),
            ],
        );
        land.uint(15, 2); // version
        land.bytes(1, b"land");
        land.bytes(2, &feature.0);
        land.uint(5, EXTENT as u64);
    }
    let mut places = Pb::new();
    {
        let mut feature = Pb::new();
        feature.uint(1, 2);
        feature.packed(2, &[0, 0]); // tags: keys[0] = values[0]
        feature.uint(3, 1); // type: POINT
        feature.packed(4, &[command(1, 1), zigzag(EXTENT / 2), zigzag(EXTENT / 2)]);
        let mut value = Pb::new();
        value.bytes(1, b"Park"); // string_value
        places.uint(15, 2);
        places.bytes(1, b"places");
        places.bytes(2, &feature.0);
        places.bytes(3, b"name");
        places.bytes(4, &value.0);
        places.uint(5, EXTENT as u64);
    }
    let mut tile = Pb::new();
    tile.bytes(3, &land.0);
    tile.bytes(3, &places.0);
    tile.0
}

/// A glyph range (`{fontstack}/{range}.pbf`) with no glyphs: what a font
/// server answers for a range its fonts do not cover. Labels then take no
/// space, and the renderer carries on.
pub(super) fn glyph_range(fontstack: &str, range: &str) -> Vec<u8> {
    let mut stack = Pb::new();
    stack.bytes(1, fontstack.as_bytes());
    stack.bytes(2, range.as_bytes());
    let mut glyphs = Pb::new();
    glyphs.bytes(1, &stack.0);
    glyphs.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    /// The tile is a PNG a browser can draw: the chunks' CRCs hold, the
    /// header says 256 × 256 palette, and the image data inflates to one
    /// filter byte plus 256 indices per row.
    #[test]
    fn tiles_are_well_formed_pngs() {
        let png = tile_png(3, 2, 5);
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        let mut at = 8;
        let mut kinds = Vec::new();
        let mut idat = Vec::new();
        while at < png.len() {
            let len = u32::from_be_bytes(png[at..at + 4].try_into().unwrap()) as usize;
            let kind = &png[at + 4..at + 8];
            let data = &png[at + 8..at + 8 + len];
            let crc = u32::from_be_bytes(png[at + 8 + len..at + 12 + len].try_into().unwrap());
            let mut c = flate2::Crc::new();
            c.update(kind);
            c.update(data);
            assert_eq!(c.sum(), crc, "{}", String::from_utf8_lossy(kind));
            if kind == b"IHDR" {
                assert_eq!(data, [0, 0, 1, 0, 0, 0, 1, 0, 8, 3, 0, 0, 0]);
            }
            if kind == b"IDAT" {
                idat.extend_from_slice(data);
            }
            kinds.push(String::from_utf8_lossy(kind).into_owned());
            at += 12 + len;
        }
        assert_eq!(kinds, ["IHDR", "PLTE", "IDAT", "IEND"]);
        let mut raw = Vec::new();
        flate2::read::ZlibDecoder::new(&idat[..])
            .read_to_end(&mut raw)
            .unwrap();
        assert_eq!(raw.len(), 257 * 256);
        assert_ne!(tile_png(3, 2, 5), tile_png(3, 2, 6), "neighbours differ");
    }

    /// The encodings the vector tile is made of, against the worked
    /// examples of the Protocol Buffers and Mapbox Vector Tile specs.
    #[test]
    fn protobuf_and_geometry_encodings() {
        let mut pb = Pb::new();
        pb.varint(300);
        assert_eq!(pb.0, [0xac, 0x02]);
        assert_eq!(
            [zigzag(0), zigzag(-1), zigzag(1), zigzag(-4096)],
            [0, 1, 2, 8191]
        );
        // MoveTo(1) is 9, LineTo(3) is 26, ClosePath(1) is 15.
        assert_eq!([command(1, 1), command(2, 3), command(7, 1)], [9, 26, 15]);
        let tile = vector_tile();
        // Two layers (field 3, wire type 2), named land and places.
        assert_eq!(tile[0], 0x1a);
        for name in [&b"land"[..], b"places", b"Park"] {
            assert!(tile.windows(name.len()).any(|w| w == name));
        }
        let glyphs = glyph_range("Arial Regular", "0-255");
        assert_eq!(glyphs[0], 0x0a);
        assert_eq!(&glyphs[4..17], b"Arial Regular");
    }
}
