"""A linear regression with Spark MLlib: the features file is read by relative path on the driver, the model
is fitted by the executors, metrics and the model go to the run history."""

import argparse
import json
import os

from pyspark.ml.evaluation import RegressionEvaluator
from pyspark.ml.feature import VectorAssembler
from pyspark.ml.regression import LinearRegression
from pyspark.sql import SparkSession, functions

from airflow_amlrun.run_context import Run

parser = argparse.ArgumentParser()
parser.add_argument("--reg-param", type=float, default=0.1)
parser.add_argument("--rows", type=int, default=20000)
args = parser.parse_args()

run = Run.get_context()
spark = SparkSession.builder.appName("train_spark").getOrCreate()

# The true model, from the snapshot's data file: y = sum(weight * x) + intercept + noise.
with open("data/true_model.json") as source:
    truth = json.load(source)
features = [f"x{i}" for i in range(len(truth["weights"]))]
frame = spark.range(args.rows).select(
    *(functions.rand(seed=i).alias(name) for i, name in enumerate(features))
)
label = sum(functions.col(name) * weight for name, weight in zip(features, truth["weights"], strict=True))
frame = frame.withColumn("label", label + truth["intercept"] + functions.randn(seed=99) * truth["noise"])
train, test = (
    VectorAssembler(inputCols=features, outputCol="features").transform(frame).randomSplit([0.8, 0.2], 7)
)

model = LinearRegression(regParam=args.reg_param, maxIter=50).fit(train)
predictions = model.transform(test)
for metric in ("rmse", "r2"):
    value = RegressionEvaluator(metricName=metric).evaluate(predictions)
    run.log(metric, value)
    print(f"{metric} = {value:.4f}", flush=True)
for step, loss in enumerate(model.summary.objectiveHistory):
    run.log("objective", loss, step=step)
run.tag("reg_param", args.reg_param)

os.makedirs("outputs", exist_ok=True)
with open("outputs/model.json", "w") as out:
    json.dump({"weights": list(model.coefficients), "intercept": model.intercept}, out, indent=2)
print("model written to outputs/model.json", flush=True)
spark.stop()
