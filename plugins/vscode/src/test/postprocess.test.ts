import assert from "node:assert/strict";
import { describe, test } from "node:test";
import { postprocess } from "../postprocess";

const pp = (text: string, suffix = "", singleLine = false) => postprocess(text, { suffix, singleLine });

describe("postprocess", () => {
  test("a plain completion is kept as it is", () => {
    assert.equal(pp("result = a + b", "\n    return result\n"), "result = a + b");
    assert.equal(pp("\n    return a + b", "\n"), "\n    return a + b", "leading newline and indentation matter");
  });

  test("trailing whitespace-only lines and trailing spaces go", () => {
    assert.equal(pp("return 1\n\n   \n\t\n"), "return 1");
    assert.equal(pp("x = 1   "), "x = 1");
    assert.equal(pp("if x:\n    y()\n    \n"), "if x:\n    y()");
  });

  test("blank completions are nothing", () => {
    assert.equal(pp(""), "");
    assert.equal(pp("   \n\n  "), "");
  });

  test("single-line mode cuts at the first newline", () => {
    assert.equal(pp("a + b\n    return x\n", "", true), "a + b");
    assert.equal(pp("\n    return x", "", true), "");
    assert.equal(pp("a + b\r\nmore", "", true), "a + b");
  });

  test("a completion that only repeats the suffix's beginning is dropped", () => {
    assert.equal(pp("return result", "\n    return result\n"), "");
    assert.equal(pp("    print(x)", "print(x)\n"), "");
    assert.equal(pp("print(", "print(x)\n"), "");
    assert.equal(pp("prin", "t(x)\n"), "prin", "a prefix of the rest of the word is not a repeat");
  });

  test("a completion running on into the suffix is cut before the repeated line", () => {
    const suffix = "\n    return result\n";
    assert.equal(pp("result = a + b\n    return result\n", suffix), "result = a + b");
    assert.equal(pp("result = a + b\nreturn result", suffix), "result = a + b", "indentation aside");
    // Short suffix lines are too common to cut on.
    assert.equal(pp("x = 1\n}\ny = 2", "\n}\n"), "x = 1\n}\ny = 2");
  });

  test("closers that auto-pairing left after the cursor are not repeated", () => {
    assert.equal(pp('"hello")', ")\n"), '"hello"');
    assert.equal(pp("a, b])", "])\nnext()"), "a, b");
    assert.equal(pp("\n    a,\n    b\n)", ")"), "\n    a,\n    b");
    assert.equal(pp(")", ")\n"), "", "only the closer: nothing");
    // Not closers: an identifier after the cursor is left alone.
    assert.equal(pp("a + b", "b\n"), "a + b");
  });

  test("line endings become \\n", () => {
    assert.equal(pp("a\r\nb\r\n", "\r\n"), "a\nb");
  });
});
