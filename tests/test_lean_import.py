import subprocess
import sys


def test_import_squeezer_is_light():
    code = (
        "import sys, squeezer, squeezer.cli\n"
        "heavy = [m for m in ('onnx', 'onnxruntime', 'matplotlib', 'transformers', 'scipy',"
        " 'sklearn', 'highspy') if m in sys.modules]\n"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"import squeezer pulled in: {out.stdout.strip()}"
