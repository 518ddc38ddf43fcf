// Keyboard shortcuts for the labelling form. The form works without this script; it only adds keys.
(function () {
  "use strict";
  var form = document.getElementById("label-form");
  if (!form) { return; }
  var kind = form.dataset.kind;
  var count = parseInt(form.dataset.count, 10);
  var letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ".slice(0, count);
  var note = document.getElementById("note");
  var current = 0;  // rating: the response the digit keys score

  function pickRadio(name, value) {
    var input = form.querySelector('input[name="' + name + '"][value="' + value + '"]');
    if (input) { input.checked = true; input.dispatchEvent(new Event("change", { bubbles: true })); }
  }

  function highlight() {
    letters.split("").forEach(function (letter, index) {
      var card = document.getElementById("candidate-" + letter);
      if (!card) { return; }
      var picked = false;
      if (kind === "pairwise") {
        var chosen = form.querySelector('input[name="choice"]:checked');
        picked = !!chosen && chosen.value === letter;
      } else if (kind === "ranking") {
        picked = form.querySelector('select[name="rank_' + letter + '"]').value === "1";
      }
      card.classList.toggle("picked", picked);
      card.classList.toggle("current", kind === "rating" && index === current);
    });
  }

  function nextRank() {
    var used = 0;
    letters.split("").forEach(function (letter) {
      if (form.querySelector('select[name="rank_' + letter + '"]').value) { used += 1; }
    });
    return used + 1;
  }

  function rank(letter) {
    var select = form.querySelector('select[name="rank_' + letter + '"]');
    if (select.value) { return; }
    select.value = String(nextRank());
  }

  function submit(buttonId) {
    var button = document.getElementById(buttonId);
    if (button) { form.requestSubmit(button); }
  }

  document.addEventListener("keydown", function (event) {
    if (event.ctrlKey && event.key === "Enter") { event.preventDefault(); submit("submit"); return; }
    if (event.altKey || event.ctrlKey || event.metaKey) { return; }
    var target = event.target;
    if (target === note) {
      if (event.key === "Escape") { note.blur(); }
      return;
    }
    if (target.tagName === "SELECT" && /^[0-9]$/.test(event.key)) { return; }
    var key = event.key;
    var upper = key.length === 1 ? key.toUpperCase() : "";
    var handled = true;
    if (key === "Enter") {
      submit("submit");
    } else if (kind === "pairwise" && (upper === "A" || key === "ArrowLeft")) {
      pickRadio("choice", "A");
    } else if (kind === "pairwise" && (upper === "B" || key === "ArrowRight")) {
      pickRadio("choice", "B");
    } else if (kind === "pairwise" && upper === "T") {
      pickRadio("choice", "tie");
    } else if (kind === "pairwise" && /^[1-3]$/.test(key)) {
      pickRadio("strength", key);
    } else if (kind === "binary" && (upper === "U" || key === "+")) {
      pickRadio("thumb", "up");
    } else if (kind === "binary" && (upper === "D" || key === "-")) {
      pickRadio("thumb", "down");
    } else if (kind === "ranking" && upper && letters.indexOf(upper) >= 0) {
      rank(upper);
    } else if (kind === "ranking" && (key === "Backspace" || key === "Delete")) {
      letters.split("").forEach(function (letter) { form.querySelector('select[name="rank_' + letter + '"]').value = ""; });
    } else if (kind === "rating" && /^[1-7]$/.test(key)) {
      pickRadio("score_" + letters[current], key);
      current = Math.min(current + 1, count - 1);
    } else if (kind === "rating" && (key === "ArrowRight" || key === "ArrowLeft")) {
      current = Math.max(0, Math.min(count - 1, current + (key === "ArrowRight" ? 1 : -1)));
    } else if (upper === "S") {
      submit("skip");
    } else if (upper === "N" && note) {
      note.focus();
    } else {
      handled = false;
    }
    if (handled) { event.preventDefault(); highlight(); }
  });
  form.addEventListener("change", highlight);
  highlight();
})();
