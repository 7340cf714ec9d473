"""Regenerate sample_docs/report.pdf, a 3-page report with a text layer.

The generated PDF is committed so that users and tests need no reportlab; rerun this script
(`python sample_docs/make_pdf.py`, needs the dev extra) only when the text below changes.
Tests rely on the Heron pump throughput fact being on page 2.
"""

from __future__ import annotations

from pathlib import Path

from reportlab.lib.pagesizes import A4
from reportlab.lib.units import cm
from reportlab.pdfgen.canvas import Canvas

TITLE = "Field Trial Report: Heron Irrigation Pump (Trial HX-3)"

PAGES = [
    [
        "1. Summary",
        "",
        "This report describes the six-week field trial of the Heron irrigation pump carried",
        "out by the Westbrook Agricultural Station between 3 March and 14 April 2024.",
        "The trial compared the Heron prototype (serial HX-3-0117) with the station's",
        "existing Marlin M2 pump on the same 1.8 hectare plot of spring barley.",
        "",
        "The trial was led by engineer Priya Ramaswamy, with soil sampling by Tomas Keller.",
        "Section 2 gives the measured performance, and section 3 the recommendations.",
    ],
    [
        "2. Measurements",
        "",
        "Flow was logged every ten minutes with a calibrated ultrasonic meter.",
        "The measured throughput of the Heron pump was 42.7 litres per minute at a",
        "delivery head of 12 metres, against 35.1 litres per minute for the Marlin M2.",
        "Average electrical draw was 410 watts for the Heron and 520 watts for the Marlin.",
        "",
        "The Heron ran for 611 hours in total. It stopped twice: once when the intake",
        "filter clogged with algae (day 19) and once after a grid outage (day 33).",
        "Neither stop damaged the pump, and both restarts were automatic.",
    ],
    [
        "3. Recommendations",
        "",
        "The station should replace its three Marlin M2 pumps with Heron units before the",
        "2025 season. The expected energy saving is about 21 percent per pump.",
        "A finer intake mesh (0.5 mm instead of 1 mm) should be fitted to avoid algae clogs.",
        "",
        "Budget request: 3 pumps at 1,250 euros each, plus 300 euros for installation.",
        "Contact for questions: p.ramaswamy@westbrook-station.example",
    ],
]


def write_report(path: Path) -> None:
    """Draw one page per entry of PAGES, with a title and a footer carrying the page number."""
    canvas = Canvas(str(path), pagesize=A4, invariant=True)  # invariant: byte-stable output
    width, height = A4
    for number, lines in enumerate(PAGES, start=1):
        canvas.setFont("Helvetica-Bold", 14)
        canvas.drawString(2 * cm, height - 2.5 * cm, TITLE)
        canvas.setFont("Helvetica", 11)
        y = height - 4 * cm
        for line in lines:
            canvas.drawString(2 * cm, y, line)
            y -= 0.6 * cm
        canvas.setFont("Helvetica", 9)
        canvas.drawString(width / 2 - 1 * cm, 1.5 * cm, f"Page {number} of {len(PAGES)}")
        canvas.showPage()
    canvas.save()


if __name__ == "__main__":
    write_report(Path(__file__).with_name("report.pdf"))
