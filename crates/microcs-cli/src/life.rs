//! Conway's Game of Life, the service `microcs demo` runs (`microcs serve NAME --life`).
//!
//! A board is text: rows of `.` (dead) and `#` (alive), one per line, all the same length. The
//! board wraps around at its edges (a torus), so a glider flies forever.

use std::fmt;

use microcs::{RemoteError, Request};

/// At most this many cell updates per request (generations × cells), so one request cannot keep
/// a worker busy for long.
const MAX_WORK: u64 = 200_000_000;
/// At most this many generations per `steps` request.
pub const MAX_STEPS: u64 = 100_000;

/// A Game of Life board.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Board {
    width: usize,
    height: usize,
    cells: Vec<bool>,
}

impl Board {
    /// Parses rows of `.` and `#`.
    ///
    /// # Errors
    ///
    /// A message saying which row or cell is wrong and what is expected.
    pub fn parse(text: &str) -> Result<Board, String> {
        let rows: Vec<&str> = text.lines().map(|l| l.strip_suffix('\r').unwrap_or(l)).collect();
        let rows = match rows.iter().rposition(|r| !r.is_empty()) {
            Some(last) => &rows[..=last],
            None => return Err("the board is empty; send rows of '.' (dead) and '#' (alive)".into()),
        };
        let width = rows[0].chars().count();
        let mut cells = Vec::with_capacity(width * rows.len());
        for (y, row) in rows.iter().enumerate() {
            let n = row.chars().count();
            if n != width {
                return Err(format!(
                    "row {} has {n} cells but row 1 has {width}; every row must be the same length",
                    y + 1
                ));
            }
            for (x, c) in row.chars().enumerate() {
                cells.push(match c {
                    '#' => true,
                    '.' => false,
                    other => {
                        return Err(format!(
                            "row {}, column {}: {other:?} is not a cell; use '.' (dead) or '#' (alive)",
                            y + 1,
                            x + 1
                        ));
                    }
                });
            }
        }
        Ok(Board { width, height: rows.len(), cells })
    }

    /// Number of cells.
    pub fn len(&self) -> usize {
        self.cells.len()
    }

    /// The next generation: a live cell with 2 or 3 live neighbours lives, a dead cell with
    /// exactly 3 comes alive, every other cell is dead.
    pub fn step(&self) -> Board {
        let (w, h) = (self.width, self.height);
        let mut next = vec![false; self.cells.len()];
        for y in 0..h {
            let (up, down) = ((y + h - 1) % h, (y + 1) % h);
            for x in 0..w {
                let (left, right) = ((x + w - 1) % w, (x + 1) % w);
                let live = [
                    (up, left),
                    (up, x),
                    (up, right),
                    (y, left),
                    (y, right),
                    (down, left),
                    (down, x),
                    (down, right),
                ]
                .iter()
                .filter(|&&(yy, xx)| self.cells[yy * w + xx])
                .count();
                let alive = self.cells[y * w + x];
                next[y * w + x] = live == 3 || (alive && live == 2);
            }
        }
        Board { width: w, height: h, cells: next }
    }
}

impl fmt::Display for Board {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for row in self.cells.chunks(self.width.max(1)) {
            for &c in row {
                f.write_str(if c { "#" } else { "." })?;
            }
            f.write_str("\n")?;
        }
        Ok(())
    }
}

fn bad_request(msg: String) -> RemoteError {
    RemoteError::new(microcs::proto::status::BAD_REQUEST, msg)
}

/// Default handler: one generation.
///
/// # Errors
///
/// Code 400 for a payload that is not a board.
pub fn next_generation(req: Request) -> Result<String, RemoteError> {
    let board = Board::parse(req.text()?).map_err(bad_request)?;
    Ok(board.step().to_string())
}

/// Method `steps`: the first line is a generation count, the rest a board.
///
/// # Errors
///
/// Code 400 for a bad count or board, or too much work; 499 when the caller gave up meanwhile.
pub fn steps(req: Request) -> Result<String, RemoteError> {
    let (n, mut board) = generations(&req)?;
    for _ in 0..n {
        if req.is_cancelled() {
            return Err(RemoteError::new(microcs::proto::status::CANCELLED, "the caller gave up"));
        }
        board = board.step();
    }
    Ok(board.to_string())
}

/// The streaming method `run`: "N\n" then a board in, the N generations after it out, one item
/// each (as they are computed; the stream stops when the caller does).
///
/// # Errors
///
/// As [`steps`], before any item.
pub fn run(req: Request) -> Result<impl Iterator<Item = Result<String, RemoteError>> + Send, RemoteError> {
    let (n, mut board) = generations(&req)?;
    Ok((0..n).map(move |_| {
        board = board.step();
        Ok(board.to_string())
    }))
}

/// "N\n" and a board: the generation count (bounded, and bounded by the work) and the board.
fn generations(req: &Request) -> Result<(u64, Board), RemoteError> {
    let text = req.text()?;
    let (count, board) = text.split_once('\n').unwrap_or((text, ""));
    let n: u64 = count.trim().parse().map_err(|_| {
        bad_request(format!(
            "the first line must be a number of generations (0 to {MAX_STEPS}), then the board; got {:?}",
            count.trim()
        ))
    })?;
    if n > MAX_STEPS {
        return Err(bad_request(format!("{n} generations is too many; at most {MAX_STEPS} per request")));
    }
    let board = Board::parse(board).map_err(bad_request)?;
    if n.saturating_mul(board.len() as u64) > MAX_WORK {
        return Err(bad_request(format!(
            "{n} generations of a {}-cell board is too much work for one request; send fewer generations",
            board.len()
        )));
    }
    Ok((n, board))
}

/// A glider in the top-left corner of an 8×6 board.
pub const GLIDER: &str = ".#......\n..#.....\n###.....\n........\n........\n........\n";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blinker_oscillates() {
        let b = Board::parse(".....\n..#..\n..#..\n..#..\n.....").unwrap();
        let s = b.step();
        assert_eq!(s.to_string(), ".....\n.....\n.###.\n.....\n.....\n");
        assert_eq!(s.step(), b);
    }

    #[test]
    fn glider_returns_shifted_after_four_generations() {
        let mut b = Board::parse(GLIDER).unwrap();
        for _ in 0..4 {
            b = b.step();
        }
        assert_eq!(b.to_string(), "........\n..#.....\n...#....\n.###....\n........\n........\n");
    }

    #[test]
    fn bad_boards_say_what_is_wrong() {
        assert!(Board::parse("").unwrap_err().contains("empty"));
        assert!(Board::parse("..\n...").unwrap_err().contains("row 2 has 3 cells"));
        assert!(Board::parse("..\n.x").unwrap_err().contains("row 2, column 2"));
        assert_eq!(Board::parse("#.\r\n.#\r\n\n").unwrap().to_string(), "#.\n.#\n");
    }

    #[test]
    fn steps_method() {
        let r = steps(Request::for_test(Some("steps"), format!("4\n{GLIDER}").into_bytes())).unwrap();
        assert_eq!(r, "........\n..#.....\n...#....\n.###....\n........\n........\n");
        let e = steps(Request::for_test(Some("steps"), b"x\n#".to_vec())).unwrap_err();
        assert_eq!(e.code(), 400);
        let e = steps(Request::for_test(Some("steps"), b"999999999\n#".to_vec())).unwrap_err();
        assert!(e.message().contains("too many"), "{e}");
    }

    #[test]
    fn run_streams_each_generation_and_ends_where_steps_does() {
        let req = |n: u32| Request::for_test(Some("run"), format!("{n}\n{GLIDER}").into_bytes());
        let items: Vec<String> = run(req(4)).unwrap().map(Result::unwrap).collect();
        assert_eq!(items.len(), 4);
        assert_eq!(items[3], steps(req(4)).unwrap());
        assert_eq!(items[0], steps(req(1)).unwrap());
        assert!(run(Request::for_test(Some("run"), b"x\n#".to_vec())).is_err());
    }
}
