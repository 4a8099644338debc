// Client-side clean-up of a completion before it is shown. The server already stops where the
// model runs into the suffix; these rules catch what is left. No VS Code API here.

export interface PostprocessOptions {
  /** The text after the cursor that was sent (the suffix window). */
  suffix: string;
  singleLine: boolean;
}

// What an editor's auto-closing leaves after the cursor: brackets, quotes, separators.
const CLOSERS = /^[\s)\]}>"'`;,:.]+$/;

/**
 * The text to show, or "" for nothing:
 * - line endings become `\n` (the editor writes the document's own);
 * - single-line mode keeps the first line only;
 * - a completion that goes on to repeat the suffix's first non-blank line is cut before it;
 * - a tail repeating what auto-closing left on the cursor's line (`)`, `"]`, ...) is dropped;
 * - trailing whitespace and whitespace-only lines go;
 * - nothing is shown when the rest is blank or only repeats the beginning of the suffix.
 */
export function postprocess(text: string, options: PostprocessOptions): string {
  let result = text.replace(/\r\n?/g, "\n");
  const suffix = options.suffix.replace(/\r\n?/g, "\n");

  if (options.singleLine) {
    const newline = result.indexOf("\n");
    if (newline !== -1) {
      result = result.slice(0, newline);
    }
  }

  result = cutAtSuffixLine(result, suffix);

  const restOfLine = suffix.split("\n", 1)[0];
  const closers = restOfLine.trim();
  if (closers && CLOSERS.test(restOfLine)) {
    const trimmed = result.replace(/\s+$/, "");
    if (trimmed.endsWith(closers)) {
      result = trimmed.slice(0, trimmed.length - closers.length);
    }
  }

  result = result.replace(/\s+$/, "");
  if (!result.trim()) {
    return "";
  }
  const ahead = suffix.trimStart();
  if (ahead && ahead.startsWith(result.trim())) {
    return ""; // it would only repeat what follows the cursor
  }
  return result;
}

/** Cut before a line (after the first) that equals the suffix's first non-blank line. */
function cutAtSuffixLine(text: string, suffix: string): string {
  const target = suffix
    .split("\n")
    .map((line) => line.trim())
    .find((line) => line.length > 0);
  if (!target || target.length < 4) {
    return text;
  }
  const lines = text.split("\n");
  for (let i = 1; i < lines.length; i++) {
    if (lines[i].trim() === target) {
      return lines.slice(0, i).join("\n");
    }
  }
  return text;
}

