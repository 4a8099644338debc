// Client-side clean-up of a completion before it is shown.

/** Trailing blank lines and trailing spaces go; in single-line mode, everything after the
 *  first line; a completion that only repeats the text after the cursor is dropped. */
export function postprocess(text: string, suffix: string, singleLine: boolean): string {
  let result = singleLine ? text.split("\n", 1)[0] : text;
  result = result.replace(/[ \t]*(\r?\n[ \t]*)*$/, "");
  if (!result.trim()) {
    return "";
  }
  const next = suffix.trimStart();
  if (next && next.startsWith(result.trim())) {
    return "";
  }
  return result;
}
